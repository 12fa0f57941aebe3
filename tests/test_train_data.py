"""Data sets, augmentation and models of the reference trainer (ncfast.train.data / .models).

Every file is written here into tmp_path (tiny IDX files, tiny CIFAR pickles); nothing is downloaded.
"""

import dataclasses
import gzip
import hashlib
import io
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ncfast.labels import coarse_labels
from ncfast.train import data
from ncfast.train.data import augment_batch, batches, gaussian_mixture, load_dataset
from ncfast.train.models import ARCHS, build_model, logits_for_loss

# ------------------------------------------------------------------------------------------ helpers


def write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def make_idx_dir(root, gz, n_train=20, n_test=10, seed=0):
    """The four (Fashion-)MNIST files; gz: True, False, or "mixed" (images gzipped, labels plain)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / name, arr, gz if gz != "mixed" else "images" in name)
    return arrays


def cifar_batches(name, n_train=30, n_test=10, seed=0):
    """{member: pickled bytes} in the layout of the official python-version archive."""
    rng = np.random.default_rng(seed)
    src = data.CIFAR[name]
    per = n_train // len(src.train)
    out, raw = {}, {}
    for members, n in ((src.train, per), (src.test, n_test)):
        for m in members:
            x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            y = rng.integers(0, src.num_classes, n)
            d = {b"batch_label": m.encode(), b"data": x}
            if name == "cifar10":
                d[b"labels"] = y.tolist()
            else:
                d[b"fine_labels"] = y.tolist()
                d[b"coarse_labels"] = (y // 5).tolist()
            out[m] = pickle.dumps(d)
            raw[m] = (x, y)
    return out, raw


def trust_cifar(monkeypatch, name, members):
    """Take the MD5s of these made-up batches as the published ones (the loader refuses to unpickle
    any other file)."""
    md5 = {m: hashlib.md5(blob).hexdigest() for m, blob in members.items()}
    monkeypatch.setitem(data.CIFAR, name, dataclasses.replace(data.CIFAR[name], members_md5=md5))


def write_members(root, name, layout, members):
    """CIFAR batch files {member: bytes} written in a layout: "tar" (the .tar.gz in root), "folder"
    (root/<folder>/...), "direct" (root is the folder)."""
    src = data.CIFAR[name]
    root.mkdir(parents=True, exist_ok=True)
    if layout == "tar":
        with tarfile.open(root / src.archive, "w:gz") as tar:
            for m, blob in members.items():
                info = tarfile.TarInfo(f"{src.folder}/{m}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        folder = root / src.folder if layout == "folder" else root
        folder.mkdir(parents=True, exist_ok=True)
        for m, blob in members.items():
            (folder / m).write_bytes(blob)


def write_cifar(root, name, layout, monkeypatch, **kw):
    """Made-up batches written by ``write_members``; their MD5s become the published ones for the
    test (``trust_cifar``)."""
    members, raw = cifar_batches(name, **kw)
    trust_cifar(monkeypatch, name, members)
    write_members(root, name, layout, members)
    return raw


def expected_normalised(train_u8, test_u8, scale):
    """Reference: x / scale, then per-channel (x - mean) / std of the train split, in float64."""
    tr = train_u8.astype(np.float64) / scale
    te = test_u8.astype(np.float64) / scale
    mean = tr.mean(axis=(0, 2, 3), keepdims=True)
    std = tr.std(axis=(0, 2, 3), keepdims=True)
    return (tr - mean) / std, (te - mean) / std, mean.ravel(), std.ravel()


def features_at(model, name, x):
    """(logits, output of module `name`) for one forward pass."""
    seen = {}
    hook = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return logits, seen["h"]


# ---------------------------------------------------------------------------------- MNIST / IDX


@pytest.mark.parametrize("gz", [True, False, "mixed"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_sets_load_with_shapes_labels_and_normalisation(tmp_path, gz, name):
    arrays = make_idx_dir(tmp_path, gz)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.name == name and ds.num_classes == 10
    assert ds.augment and not ds.flip
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    tr, te, mean, std = expected_normalised(
        arrays["train-images-idx3-ubyte"][:, None], arrays["t10k-images-idx3-ubyte"][:, None], 255.0
    )
    np.testing.assert_allclose(ds.train_x.numpy(), tr, atol=1e-5)
    np.testing.assert_allclose(ds.test_x.numpy(), te, atol=1e-5)
    np.testing.assert_allclose(ds.mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(ds.std.numpy(), std, rtol=1e-12)


def test_idx_missing_files_say_which_and_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--data") as e:
        load_dataset("mnist")
    for base in data.IDX_FILES:
        assert base in str(e.value)

    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "missing t10k-labels-idx1-ubyte[.gz]" in msg and str(tmp_path) in msg
    assert "missing train-images" not in msg

    nowhere = tmp_path / "no-such-dir"
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(nowhere))
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    assert str(nowhere) in msg and "apt install dataset-fashion-mnist" in msg and "--data DIR" in msg
    for base in data.IDX_FILES:
        assert base in msg


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: b"\x01" + raw[1:], "magic number"),
        (lambda raw: raw[:2] + b"\x0d" + raw[3:], "element type"),  # 0x0D: float, not ubyte
        (lambda raw: raw[:3] + b"\x02" + raw[4:], "dimensions"),
        (lambda raw: raw[:-5], "data bytes"),
    ],
)
@pytest.mark.parametrize("gz", [True, False])
def test_corrupted_idx_raises_value_error(tmp_path, damage, match, gz):
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = damage(path.read_bytes())
    if gz:
        path.unlink()
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_gzip_bomb_costs_only_what_its_header_announces(tmp_path):
    """A 256 KiB .gz whose header announces 10 labels but inflates to 256 MiB: the header is checked
    first and only the announced bytes (and one more) are inflated, so the process grows by far less
    than the stream (it grew by the whole stream, 2.4 GB for a 1 GiB one, before the header was
    checked). A file that is not gzip past its magic is a ValueError naming it."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip stream
    with open(path, "wb") as f:
        f.write(comp.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 10)))
        zeros = bytes(1 << 24)
        for _ in range(16):
            f.write(comp.compress(zeros))
        f.write(comp.flush())
    code = (
        "import resource; from ncfast.train.data import read_idx\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    read_idx({str(path)!r}, 1)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    message, grown_kib = out.stdout.strip().splitlines()
    assert "more data bytes, but the header's sizes (10,) need 10" in message and str(path) in message
    assert int(grown_kib) < 32 * 1024
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x1f\x8b" + b"not a gzip stream at all")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        data.read_idx(bad, 1)


def test_idx_image_and_label_counts_must_agree(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8), gz=False)
    with pytest.raises(ValueError, match="20 images but .* 19 labels"):
        load_dataset("mnist", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("layout", ["tar", "folder", "direct"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_from_archive_or_folder(tmp_path, layout, name, monkeypatch):
    raw = write_cifar(tmp_path, name, layout, monkeypatch)
    src = data.CIFAR[name]
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.num_classes == src.num_classes and ds.augment and ds.flip
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    train_x = np.concatenate([raw[m][0] for m in src.train]).reshape(-1, 3, 32, 32)
    train_y = np.concatenate([raw[m][1] for m in src.train])
    test_x = raw[src.test[0]][0].reshape(-1, 3, 32, 32)
    assert ds.train_y.tolist() == train_y.tolist()
    assert ds.test_y.tolist() == raw[src.test[0]][1].tolist()
    tr, te, mean, std = expected_normalised(train_x, test_x, 255.0)
    np.testing.assert_allclose(ds.train_x.numpy(), tr, atol=1e-5)
    np.testing.assert_allclose(ds.test_x.numpy(), te, atol=1e-5)
    # channel-major rows of 1024: pixel (c, i, j) of an image is data[c * 1024 + 32 * i + j]
    flat = raw[src.train[0]][0][0].astype(np.float64) / 255
    assert abs(ds.train_x[0, 2, 3, 5].item() * std[2] + mean[2] - flat[2 * 1024 + 3 * 32 + 5]) < 1e-6
    if name == "cifar100":
        present = torch.cat([ds.train_y, ds.test_y]).unique()
        assert torch.equal(ds.coarse_of[present], present // 5)
    else:
        assert ds.coarse_of is None


def test_cifar_missing_data_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--data DIR"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar100", data_dir=tmp_path)
    msg = str(e.value)
    assert "cifar-100-python.tar.gz" in msg and "cifar-100-python/" in msg and "--download" in msg
    # an incomplete folder is not taken for the data
    write_cifar(tmp_path, "cifar10", "folder", monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)
    # an archive without one of the batches is broken
    members, _ = cifar_batches("cifar10")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for m, blob in members.items():
            if m != "test_batch":
                info = tarfile.TarInfo(f"cifar-10-batches-py/{m}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ValueError, match="no member cifar-10-batches-py/test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_download_is_md5_checked(tmp_path, monkeypatch):
    def fake_urlopen(payload):
        def urlopen(url):
            assert url == data.CIFAR["cifar10"].url
            return io.BytesIO(payload)

        return urlopen

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen(b"not the archive"))
    with pytest.raises(RuntimeError, match="MD5"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []  # neither the archive nor the .part stays

    src_dir = tmp_path / "src"
    write_cifar(src_dir, "cifar10", "tar", monkeypatch)
    blob = (src_dir / "cifar-10-python.tar.gz").read_bytes()
    monkeypatch.setitem(
        data.CIFAR, "cifar10", dataclasses.replace(data.CIFAR["cifar10"], md5=hashlib.md5(blob).hexdigest())
    )
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen(blob))
    dest = tmp_path / "dest"
    ds = load_dataset("cifar10", data_dir=dest, download=True)
    assert ds.train_x.shape == (30, 3, 32, 32)
    assert (dest / "cifar-10-python.tar.gz").read_bytes() == blob


def test_cifar_bad_pickle_is_a_value_error(tmp_path, monkeypatch):
    members, _ = cifar_batches("cifar10")
    members["test_batch"] = pickle.dumps({b"data": 1})
    trust_cifar(monkeypatch, "cifar10", members)
    write_members(tmp_path, "cifar10", "folder", members)
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


class _Payload:
    """A pickle that creates a file when it is loaded: what a crafted batch or checkpoint can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("layout", ["folder", "tar"])
@pytest.mark.parametrize("trusted", [False, True])
def test_cifar_batch_with_a_payload_runs_no_code(tmp_path, monkeypatch, layout, trusted):
    """A batch file carrying a pickle payload: refused by its MD5 before it is unpickled, and, were its
    MD5 the published one, by the unpickler, which admits only the types a batch holds. Either way
    a ValueError names the file and the payload's marker file never appears."""
    marker = tmp_path / "ran"
    members, _ = cifar_batches("cifar10")
    members["data_batch_1"] = pickle.dumps({b"data": _Payload(marker), b"labels": [0]})  # the first read
    if trusted:
        trust_cifar(monkeypatch, "cifar10", members)
    root = tmp_path / "data"
    write_members(root, "cifar10", layout, members)
    with pytest.raises(ValueError, match="data_batch_1") as e:
        load_dataset("cifar10", data_dir=root)
    assert ("not part of a CIFAR batch" if trusted else "differs from the published") in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ digits


def test_digits_split_is_stratified_seeded_and_normalised():
    a = load_dataset("digits", seed=0)
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert a.augment and not a.flip and a.num_classes == 10
    total = torch.bincount(torch.cat([a.train_y, a.test_y]), minlength=10)
    test = torch.bincount(a.test_y, minlength=10)
    assert ((test - 0.2 * total).abs() <= 1).all()  # stratified
    b = load_dataset("digits", seed=0)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    c = load_dataset("digits", seed=1)
    assert not torch.equal(a.test_y, c.test_y)
    assert abs(a.train_x.mean().item()) < 1e-5 and abs(a.train_x.std(unbiased=False).item() - 1) < 1e-4
    raw = a.train_x * a.std.float() + a.mean.float()
    assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    np.testing.assert_allclose((raw * 16).numpy(), (raw * 16).round().numpy(), atol=1e-4)


# ---------------------------------------------------------------------------------------------- gmm


def class_means(x, y, c):
    return torch.stack([x[y == k].double().mean(0) for k in range(c)])


def test_gaussian_mixture_shapes_and_noise():
    x, y = gaussian_mixture(n_per_cluster=500, clusters=8, dim=16, sigma2=4.0, seed=0)
    assert x.shape == (4000, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [500] * 8
    within = torch.stack([x[y == k].double().var(0, unbiased=False).mean() for k in range(8)])
    assert ((within - 1).abs() < 0.1).all()  # N(mu_c, I)
    x2, y2 = gaussian_mixture(n_per_cluster=500, clusters=8, dim=16, sigma2=4.0, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_gaussian_mixture_similar_superclasses_follow_the_appendix():
    """B.1: super-classes {c, c + K} (eq. 4 with K = 4); the first K/2 have sub-class means within tau."""
    k = 4
    assert coarse_labels(torch.arange(8), k).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    x0, y0 = gaussian_mixture(clusters=8, dim=32, sigma2=4.0, tau2=None, seed=3)
    x1, y1 = gaussian_mixture(clusters=8, dim=32, sigma2=4.0, tau2=1e-4, seed=3)
    assert torch.equal(y0, y1)
    m0, m1 = class_means(x0, y0, 8), class_means(x1, y1, 8)
    gap = lambda m, s: (m[s] - m[s + k]).norm().item()  # noqa: E731
    typical = (2 * 4.0 * 32) ** 0.5  # E||mu_a - mu_b|| for independent N(0, 4 I) in 32-D, about 16
    for s in (0, 1):  # similar: the two means are sqrt(2 * 32 * 1e-4) apart, plus sampling noise
        assert gap(m1, s) < 1.0 and gap(m0, s) > typical / 2
    for s in (2, 3):  # dissimilar, and the very same draw as without tau2
        assert gap(m1, s) > typical / 2
        assert torch.equal(x0[y0 == s], x1[y1 == s]) and torch.equal(x0[y0 == s + k], x1[y1 == s + k])


def test_gmm_dataset_split():
    ds = load_dataset("gmm", seed=0)
    assert ds.train_x.shape == (4000, 32) and ds.test_x.shape == (1000, 32)
    assert torch.bincount(ds.train_y).tolist() == [500] * 8
    assert torch.bincount(ds.test_y).tolist() == [125] * 8
    assert not ds.augment and not ds.flip and ds.mean is None and ds.num_classes == 8
    again = load_dataset("gmm", seed=0)
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    small = load_dataset("gmm", seed=1, dim=4, clusters=4, n_per_cluster=10)
    assert small.train_x.shape == (32, 4) and small.num_classes == 4


def test_load_dataset_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("svhn")
    with pytest.raises(TypeError, match="gmm"):
        load_dataset("digits", sigma2=2.0)
    with pytest.raises(ValueError, match="clusters"):
        gaussian_mixture(clusters=7)


# ------------------------------------------------------------------------------------ augmentation


def test_augment_batch_crops_and_flips_deterministically():
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, torch.Generator().manual_seed(5), pad=4, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    again = augment_batch(x, torch.Generator().manual_seed(5), pad=4, flip=True)
    assert torch.equal(out, again)
    other = augment_batch(x, torch.Generator().manual_seed(6), pad=4, flip=True)
    assert not torch.equal(out, other)
    # every image is one of the 9 x 9 zero-padded crops, mirrored or not
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_augment_batch_pad0_identity_and_flip_only():
    x = torch.randn(5, 3, 4, 6)
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=False), x)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    assert all(torch.equal(o, xi) or f for o, xi, f in zip(out, x, flipped))
    many = augment_batch(x.repeat(40, 1, 1, 1), torch.Generator().manual_seed(1), pad=0, flip=True)
    share = np.mean([torch.equal(o, xi.flip(-1)) for o, xi in zip(many, x.repeat(40, 1, 1, 1))])
    assert 0.3 < share < 0.7
    with pytest.raises(ValueError, match="x"):
        augment_batch(x[0], torch.Generator())


def test_batches_cover_every_index_once():
    g = torch.Generator().manual_seed(0)
    parts = list(batches(10, 3, g))
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    again = list(batches(10, 3, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert [p.tolist() for p in batches(5, 2, None, shuffle=False)] == [[0, 1], [2, 3], [4]]
    assert [len(p) for p in batches(10, 3, g, drop_last=True)] == [3, 3, 3]


# ------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("in_channels, size", [(1, 8), (3, 32)])
@pytest.mark.parametrize("arch", ARCHS)
def test_models_forward_and_expose_head_penultimate_probes(arch, in_channels, size):
    torch.manual_seed(0)
    model = build_model(arch, 10, in_channels, size).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        logits, h = features_at(model, model.penultimate_name, x)
    assert logits.shape == (2, 10)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    assert h.shape == (2, model.head.in_features)
    torch.testing.assert_close(model.head(h), logits)  # h is exactly what the head sees
    modules = dict(model.named_modules())
    assert model.default_probe_layers[-1] == model.penultimate_name
    assert all(name in modules for name in model.default_probe_layers)


def test_resnet18_stages_and_mlp_flat_input():
    model = build_model("resnet18", 5, 3, 32, width=8)
    assert model.default_probe_layers == ["layer1", "layer2", "layer3", "layer4", "pool"]
    assert model.head.in_features == 64
    flat = build_model("mlp", 8, 32, None, hidden=(16,))
    assert flat(torch.randn(3, 32)).shape == (3, 8) and flat.penultimate_name == "layer1"
    with pytest.raises(ValueError, match="input_size"):
        build_model("vgg11", 8, 32, None)
    with pytest.raises(ValueError, match="arch"):
        build_model("resnet50", 10, 3, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_scale_multiplies_initial_weights(arch):
    torch.manual_seed(0)
    one = build_model(arch, 10, 1, 8, init_scale=1.0)
    torch.manual_seed(0)
    half = build_model(arch, 10, 1, 8, init_scale=0.5)
    p1, p2 = dict(one.named_parameters()), dict(half.named_parameters())
    scaled = {n for n, m in one.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert scaled
    for name, p in p1.items():
        owner, _, kind = name.rpartition(".")
        factor = 0.5 if owner in scaled and kind == "weight" else 1.0
        torch.testing.assert_close(p2[name], factor * p, rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_scale"):
        build_model(arch, 10, 1, 8, init_scale=0.0)


@pytest.mark.parametrize("arch", ["resnet18", "mlp"])
def test_output_layernorm_normalises_penultimate_features(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, 3, 8, output_norm="layernorm").eval()
    assert model.penultimate_name == "norm" and model.default_probe_layers[-1] == "norm"
    x = 3 + 5 * torch.randn(4, 3, 8, 8)
    before = "pool" if arch == "resnet18" else "layer2"
    with torch.no_grad():
        logits, h = features_at(model, model.penultimate_name, x)
        _, raw = features_at(model, before, x)
    torch.testing.assert_close(h.mean(1), torch.zeros(4), atol=1e-5, rtol=0)
    # per sample: (raw - mean) / sqrt(var + eps), eps = 1e-5 of nn.LayerNorm
    v = raw.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(h, (raw - raw.mean(1, keepdim=True)) / (v + 1e-5).sqrt())
    torch.testing.assert_close(h.var(1, unbiased=False), (v / (v + 1e-5)).flatten())
    torch.testing.assert_close(model.head(h), logits)
    assert not any(p.requires_grad for p in model.norm.parameters())  # no affine
    with pytest.raises(ValueError, match="output_norm"):
        build_model(arch, 10, 3, 8, output_norm="batchnorm")


def test_logits_for_loss_multiplies_by_the_logit_scale():
    """Paper 002's T multiplies the logits: T = 100 means logits x 100, a greater logits norm."""
    z = torch.tensor([[1.0, -2.0, 4.0]])
    torch.testing.assert_close(logits_for_loss(z, 100.0), torch.tensor([[100.0, -200.0, 400.0]]))
    torch.testing.assert_close(logits_for_loss(z, 0.25), z / 4)
    assert logits_for_loss(z, 100.0).norm() > z.norm()
    assert logits_for_loss(z) is z
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale"):
            logits_for_loss(z, bad)


@pytest.mark.parametrize(
    "arch, depth, convs",
    [
        ("resnet18", None, 2 * 8 + 1 + 3),
        ("resnet34", None, 2 * 16 + 1 + 3),
        ("resnet18", 34, 2 * 16 + 1 + 3),
        ("vgg11", None, 8),
        ("vgg13", None, 10),
        ("vgg16", None, 13),
        ("vgg19", None, 16),
        ("vgg11", 19, 16),
        ("densenet121", None, 2 * 58 + 1 + 3),
        ("densenet169", None, 2 * 82 + 1 + 3),
    ],
)
def test_depth_counts_the_conv_layers(arch, depth, convs):
    """--depth / the deeper names build the published configurations: ResNet-18 has 8 BasicBlocks of
    2 convs, a stem and 3 projection shortcuts (34: 16 blocks); VGG-11/13/16/19 have 8/10/13/16 convs;
    DenseNet-121/169 have 58/82 dense layers of 2 convs, a stem and 3 transitions."""
    model = build_model(arch, 10, 1, 8, depth=depth, width=4)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_width_sets_base_channels_and_mlp_depth_width():
    assert build_model("resnet18", 3, 1, 8, width=8).head.in_features == 64  # 8 x 8 in layer4
    assert build_model("vgg16", 3, 1, 8, width=4).head.in_features == 32  # 4 x 8 in block5
    dense = build_model("densenet121", 3, 1, 8, width=4)
    assert dense.dense1[0].conv2.out_channels == 4  # the growth rate
    mlp = build_model("mlp", 3, 1, 8, depth=4, width=32)
    hidden = [m for m in mlp.modules() if isinstance(m, nn.Linear)][:-1]
    assert [(m.in_features, m.out_features) for m in hidden] == [(64, 32), (32, 32), (32, 32), (32, 32)]
    assert mlp.default_probe_layers == ["layer1", "layer2", "layer3", "layer4"] and mlp.penultimate_name == "layer4"
    default = build_model("mlp", 3, 1, 8)
    assert [m.out_features for m in default.modules() if isinstance(m, nn.Linear)] == [512, 512, 3]
    for kwargs, match in (({"depth": 50}, "depth"), ({"depth": 0}, "depth"), ({"width": 0}, "width")):
        with pytest.raises(ValueError, match=match):
            build_model("resnet18" if kwargs.get("depth") == 50 else "mlp", 3, 1, 8, **kwargs)


def test_kaiming_init_draws_he_normal_weights_and_zero_biases():
    """init="kaiming": N(0, 2 / fan_in) weights (checked on the wide layers' sample variance) and zero
    biases; init_scale multiplies after it; the default keeps PyTorch's (variance 1 / (3 fan_in))."""
    torch.manual_seed(0)
    he = build_model("mlp", 10, 1, 32, depth=3, width=1024, init="kaiming")
    torch.manual_seed(0)
    scaled = build_model("mlp", 10, 1, 32, depth=3, width=1024, init="kaiming", init_scale=0.5)
    default = build_model("mlp", 10, 1, 32, depth=3, width=1024)
    for name in ("layer2", "layer3"):
        w = getattr(he, name)[0].weight.detach()
        assert float(w.var()) == pytest.approx(2 / 1024, rel=0.02)
        assert float(getattr(default, name)[0].weight.detach().var()) == pytest.approx(1 / (3 * 1024), rel=0.02)
        assert torch.count_nonzero(getattr(he, name)[0].bias) == 0
        torch.testing.assert_close(getattr(scaled, name)[0].weight, 0.5 * w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="init"):
        build_model("mlp", 10, 1, 8, init="xavier")


# ------------------------------------------------------------------- CIFAR archives that cannot be read


@pytest.mark.parametrize(
    "damage, cause",
    [
        ("text", "not a gzip-compressed tar archive"),
        ("empty", "not a gzip-compressed tar archive"),
        ("gzip of garbage", "gzip-compressed, but no tar archive inside"),
        ("truncated", "truncated"),
    ],
)
def test_cifar_archive_that_cannot_be_read_is_one_line(tmp_path, monkeypatch, capsys, damage, cause):
    """An archive that is plain text, empty, a gzip of garbage, or a real archive cut short is a
    ValueError naming the archive and the cause, and exit 2 on the command line. Before, tarfile's
    ReadError ("not a gzip file", "invalid header") and the truncated stream's EOFError escaped main
    as tracebacks."""
    from ncfast.train.__main__ import main

    src = data.CIFAR["cifar10"]
    archive = tmp_path / src.archive
    if damage == "text":
        archive.write_text("this is not an archive\n" * 50)
    elif damage == "empty":
        archive.write_bytes(b"")
    elif damage == "gzip of garbage":
        archive.write_bytes(gzip.compress(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()))
    else:  # the right members, trusted, in a real tar.gz, cut in the middle
        members, _ = cifar_batches("cifar10", n_train=30, n_test=10)
        trust_cifar(monkeypatch, "cifar10", members)
        write_members(tmp_path, "cifar10", "tar", members)
        raw = archive.read_bytes()
        archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"^{re.escape(str(archive))}: {cause}"):
        load_dataset("cifar10", tmp_path)
    assert (
        main(
            [
                "--dataset",
                "cifar10",
                "--data",
                str(tmp_path),
                "--arch",
                "mlp",
                "--epochs",
                "1",
                "--no-progress",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {archive}: {cause}") and "Traceback" not in err


def test_cifar_download_that_fails_is_one_line(tmp_path, monkeypatch):
    """No network (urlopen raising URLError, an OSError) is a RuntimeError naming --download and the
    URL, which main prints on one line; no .part file is left. Before, the URLError escaped main."""
    import urllib.error

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(
        RuntimeError,
        match=r"^--download: could not fetch https://.*cifar-10-python.tar.gz .*name "
        r"resolution",
    ):
        load_dataset("cifar10", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- model footprint


@pytest.mark.parametrize(
    "arch, kw, shape",
    [
        ("resnet18", {}, (3, 32)),
        ("resnet18", {"width": 4, "output_norm": "layernorm"}, (1, 8)),
        ("resnet34", {"width": 4}, (3, 16)),
        ("densenet121", {"width": 4}, (3, 16)),
        ("vgg11", {"width": 4}, (1, 8)),
        ("vgg16", {"width": 4}, (3, 32)),
        ("mlp", {}, (1, 8)),
        ("mlp", {"depth": 5, "width": 7, "output_norm": "layernorm"}, (3, 4)),
    ],
)
def test_footprint_counts_the_parameters_and_activations_of_the_real_model(arch, kw, shape):
    """models.footprint, sized without allocating (meta device; the MLP by formula): its parameter
    count is the built model's, and its activation floats per sample are those a real forward of
    one sample produces at the leaf modules, excluding views (Flatten, Identity) and in-place
    outputs; at least every conv / linear output."""
    from ncfast.train.models import _meta_footprint, footprint

    channels, size = shape
    params, floats = footprint(arch, 10, channels, size, **kw)
    model = build_model(arch, 10, channels, size, **kw).eval()
    assert params == sum(p.numel() for p in model.parameters())
    counted, layers = [0], [0]

    def hook(m, i, o):
        if not isinstance(m, (nn.Identity, nn.Flatten)) and not any(o is t for t in i):
            counted[0] += o.numel()
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            layers[0] += o.numel()

    for m in model.modules():
        if next(m.children(), None) is None:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.randn(1, channels, size, size))
    assert floats == counted[0] >= layers[0] > 0
    if arch == "mlp":
        assert (params, floats) == _meta_footprint(arch, 10, channels, size, **kw)


def test_footprint_sizes_models_that_could_never_be_built():
    """A ResNet-18 3,000,000 channels wide and an MLP 10,000 layers deep are sized in well under a
    second and allocate nothing; the MLP's depth and everyone's width are bounded."""
    import time

    from ncfast.train.models import MLP_MAX_DEPTH, footprint

    t0 = time.perf_counter()
    params, floats = footprint("resnet18", 10, 3, 32, width=3_000_000)
    assert params > 2e16 and floats > 5e10
    params, _ = footprint("mlp", 10, 64, None, depth=MLP_MAX_DEPTH)
    assert params == 64 * 512 + 512 + (MLP_MAX_DEPTH - 1) * (512 * 512 + 512) + 512 * 10 + 10
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="at most 10,000 hidden layers"):
        footprint("mlp", 10, 64, None, depth=10**8)
    with pytest.raises(ValueError, match="width: must be between 1 and"):
        build_model("resnet18", 10, 3, 32, width=10**23)
