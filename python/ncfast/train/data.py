"""Data sets of the reference trainer, held in memory as tensors, and batch augmentation on any device.

Image sets come back scaled to [0, 1] and then normalised per channel with the mean and std of their
train split. The Gaussian mixture of paper 000 appendix B comes back as generated, because its
sigma^2 and tau^2 are in input units. The files are parsed here (IDX for MNIST and Fashion-MNIST, the
pickled "python version" for CIFAR); torchvision is not needed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import sys
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .._validation import available_bytes
from ..labels import coarse_labels

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "gmm")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist

# base names of the four IDX files; each may also be gzipped (name + ".gz")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class _CifarSource:
    archive: str
    folder: str
    url: str
    md5: str
    members_md5: dict[str, str]  # the published MD5 of every batch file: checked before it is unpickled
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    num_classes: int


CIFAR = {
    "cifar10": _CifarSource(
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        members_md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": _CifarSource(
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        members_md5={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        train=("train",),
        test=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}


@dataclass
class Dataset:
    """A data set in memory (CPU tensors).

    Attributes:
        train_x, test_x: float32. Images: (N, C, H, W), scaled to [0, 1] and then normalised per
            channel with the train split's mean and std. Gaussian mixture: (N, D), as generated.
        train_y, test_y: int64 (N,), class indices in [0, num_classes).
        num_classes: number of classes of the original labels (before any coarse / fine transform).
        name: the name given to ``load_dataset``.
        augment: whether random crops with zero padding make sense for training (images only).
        flip: whether random horizontal flips make sense too (natural images only, not digits).
        mean, std: (C,) float64, the per-channel normalisation applied (on the [0, 1] scale), or None.
        coarse_of: (num_classes,) int64, the data set's own super-class of every class (CIFAR-100's 20
            official super-classes, paper 000 sec. 5; -1 for a class with no sample), or None.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str
    augment: bool
    flip: bool
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    coarse_of: torch.Tensor | None = None


def load_dataset(name: str, data_dir=None, download: bool = False, seed: int = 0, **gmm_options) -> Dataset:
    """Load a data set by name: digits, mnist, fashion-mnist, cifar10, cifar100 or gmm.

    Args:
        name: one of ``DATASETS``.
        data_dir: directory of the files. mnist: the four IDX files (``IDX_FILES``, each plain or
            .gz); fashion-mnist: the same, by default in ``FASHION_MNIST_DIR``; cifar10 / cifar100:
            the official archive (cifar-10-python.tar.gz / cifar-100-python.tar.gz), or its extracted
            folder (cifar-10-batches-py/ / cifar-100-python/) inside data_dir, or data_dir being
            that folder. Unused for digits (bundled with scikit-learn) and gmm (generated).
        download: CIFAR only: when the data is not in data_dir, download the archive there from the
            official URL and check its MD5 first. Ignored for the other data sets.
        seed: the train/test split of digits and gmm, and gmm's draw. The other sets have fixed splits.
        **gmm_options: gmm only, passed to ``gaussian_mixture`` (clusters, dim, sigma2, tau2,
            n_per_cluster). 20% of every cluster goes to the test split; the default of 625 per
            cluster leaves the 500 training samples per cluster of the appendix.

    Raises:
        FileNotFoundError: the files are missing; the message names the files expected and where.
        ValueError: unknown name, or a file that is not what its name says.
        RuntimeError: a download whose MD5 differs from the published one (it is deleted).
        TypeError: gmm options given for another data set.
    """
    key = str(name).lower()
    if gmm_options and key != "gmm":
        raise TypeError(f"options {sorted(gmm_options)} apply to name='gmm' only, not {name!r}")
    if key == "digits":
        return _digits(seed)
    if key in ("mnist", "fashion-mnist"):
        return _mnist(key, data_dir)
    if key in CIFAR:
        return _cifar(key, data_dir, download)
    if key == "gmm":
        return _gmm(seed, gmm_options)
    raise ValueError(f"name: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------- images


def _from_uint8(
    name, train_x, train_y, test_x, test_y, num_classes, *, scale, augment, flip, coarse_of=None
) -> Dataset:
    """Dataset from uint8 (N, C, H, W) arrays: x / scale, then (x - mean_c) / std_c of the train split."""
    for what, y in (("train", train_y), ("test", test_y)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name}: {what} labels outside [0, {num_classes}): min {y.min()}, max {y.max()}")
    c = train_x.shape[1]
    # exact float64 per-channel moments from a 256-bin histogram of the uint8 values: no float copy
    values = np.arange(256, dtype=np.float64) / scale
    mean = np.empty(c)
    std = np.empty(c)
    for k in range(c):
        counts = np.bincount(train_x[:, k].ravel(), minlength=256).astype(np.float64)
        n = counts.sum()
        mean[k] = counts @ values / n
        std[k] = math.sqrt(counts @ (values - mean[k]) ** 2 / n)
    std[std == 0] = 1.0  # a constant channel is only centred
    mean_t = torch.from_numpy(mean)
    std_t = torch.from_numpy(std)

    def normalise(x):
        t = torch.tensor(x, dtype=torch.float32).div_(scale)
        return t.sub_(mean_t.float().view(1, c, 1, 1)).div_(std_t.float().view(1, c, 1, 1))

    return Dataset(
        train_x=normalise(train_x),
        train_y=torch.tensor(train_y, dtype=torch.int64),
        test_x=normalise(test_x),
        test_y=torch.tensor(test_y, dtype=torch.int64),
        num_classes=num_classes,
        name=name,
        augment=augment,
        flip=flip,
        mean=mean_t,
        std=std_t,
        coarse_of=coarse_of,
    )


def _digits(seed) -> Dataset:
    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    y = d.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=seed)
    return _from_uint8("digits", x[train], y[train], x[test], y[test], 10, scale=16.0, augment=True, flip=False)


# ------------------------------------------------------------------------------------ MNIST (IDX files)


def read_idx(path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (plain or gzipped).

    The header is the magic number 0x00 0x00 <type> <ndim> followed by ndim big-endian uint32 sizes;
    the type must be 0x08 (unsigned byte), the only one (Fashion-)MNIST uses. The header is read and
    checked first; then exactly the bytes it announces are read (a gzipped file is inflated only that
    far, so a small file that inflates to gigabytes costs no more than its header says), after the
    announced size is checked against the file's size (plain) or the free memory (gzipped).
    """
    path = Path(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"  # gzip magic, whatever the file is called
    header = 4 + 4 * ndim
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            head = f.read(header)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise ValueError(
                    f"{path}: not an IDX file (magic number 0x{head[:4].hex()}: its first two bytes must be zero)"
                )
            if head[2] != 0x08:
                raise ValueError(f"{path}: IDX element type 0x{head[2]:02x} is not unsigned byte (0x08)")
            if head[3] != ndim:
                raise ValueError(f"{path}: IDX file has {head[3]} dimensions, expected {ndim}")
            if len(head) < header:
                raise ValueError(f"{path}: truncated IDX header")
            dims = tuple(int(v) for v in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
            count = math.prod(dims)
            if not gz and path.stat().st_size - header != count:
                raise ValueError(
                    f"{path}: {path.stat().st_size - header} data bytes, but the header's sizes {dims} need {count}"
                )
            free = available_bytes("cpu")
            if gz and free is not None and count > free:
                raise ValueError(f"{path}: the header's sizes {dims} need {count} bytes, more than the {free} free")
            data = f.read(count + 1)  # one byte more: a stream longer than announced is refused too
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable {'gzip' if gz else 'IDX'} file ({e})") from None
    if len(data) != count:
        raise ValueError(
            f"{path}: {'more' if len(data) > count else len(data)} data bytes, but the header's "
            f"sizes {dims} need {count}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count).reshape(dims)


def _mnist(name, data_dir) -> Dataset:
    expected = ", ".join(IDX_FILES)
    if name == "fashion-mnist":
        how = (
            "install them with `apt install dataset-fashion-mnist` (Debian/Ubuntu, into "
            f"{FASHION_MNIST_DIR}) or pass --data DIR (data_dir=DIR) for a directory that holds them"
        )
        if data_dir is None:
            data_dir = FASHION_MNIST_DIR
    else:
        how = "pass --data DIR (data_dir=DIR) for a directory that holds them"
        if data_dir is None:
            raise FileNotFoundError(
                f"{name}: no data directory given. Expected the four IDX files "
                f"{expected} (each plain or .gz) in one directory; {how}."
            )
    root = Path(data_dir).expanduser()
    paths, missing = [], []
    for base in IDX_FILES:
        found = next((root / n for n in (base, base + ".gz") if (root / n).is_file()), None)
        paths.append(found)
        if found is None:
            missing.append(base)
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {', '.join(m + '[.gz]' for m in missing)} in {root}. Expected the four "
            f"IDX files {expected} (each plain or .gz) there; {how}."
        )
    train_x, train_y, test_x, test_y = (read_idx(p, nd) for p, nd in zip(paths, (3, 1, 3, 1)))
    for x, y, xp, yp in ((train_x, train_y, paths[0], paths[1]), (test_x, test_y, paths[2], paths[3])):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: {xp} has {x.shape[0]} images but {yp} has {y.shape[0]} labels")
    return _from_uint8(
        name,
        train_x[:, None],
        train_y.astype(np.int64),
        test_x[:, None],
        test_y.astype(np.int64),
        10,
        scale=255.0,
        augment=True,
        flip=False,
    )


# ------------------------------------------------------------------------------------ CIFAR (pickles)


def _cifar(name, data_dir, download) -> Dataset:
    src = CIFAR[name]
    files = src.train + src.test
    layout = f"the archive {src.archive}, or its extracted folder {src.folder}/ with {', '.join(files)}"
    fetch = f"add --download (download=True) to fetch {src.url} (MD5-checked) into it"
    if data_dir is None:
        raise FileNotFoundError(
            f"{name}: no data directory given; pass --data DIR (data_dir=DIR) for "
            f"a directory holding {layout}, or {fetch}"
        )
    root = Path(data_dir).expanduser()
    folder = next((d for d in (root / src.folder, root) if all((d / f).is_file() for f in files)), None)
    if folder is not None:
        parts = {}
        for m in files:
            path = folder / m
            _check_member_size(path.stat().st_size, f"{path}")
            parts[m] = _cifar_batch(path.read_bytes(), f"{path}", src, m)
    else:
        archive = root / src.archive
        if not archive.is_file():
            if not download:
                extracted = root / src.folder
                lacking = [f for f in files if not (extracted / f).is_file()]
                detail = (
                    f"{extracted}/ lacks {', '.join(lacking)}" if extracted.is_dir() else f"{extracted}/ does not exist"
                )
                raise FileNotFoundError(
                    f"{name}: {archive} does not exist and {detail}. Expected "
                    f"{layout} in {root}; {fetch}, or pass --data DIR for "
                    f"another directory"
                )
            _download(src.url, archive, src.md5)
        parts = {}
        wanted = {f"{src.folder}/{m}": m for m in files}
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:  # one pass: the gzip stream cannot seek back cheaply
                    m = wanted.get(member.name)
                    if m is not None and member.isfile():
                        where = f"{archive}:{member.name}"
                        _check_member_size(member.size, where)
                        parts[m] = _cifar_batch(tar.extractfile(member).read(), where, src, m)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # BadGzipFile is an OSError
            raise ValueError(_archive_problem(archive, e, src)) from None
        lacking = [f"{src.folder}/{m}" for m in files if m not in parts]
        if lacking:
            raise ValueError(f"{archive}: no member {', '.join(lacking)}")

    def join(members):
        xs, ys, cs = zip(*(parts[m] for m in members))
        coarse = None if any(c is None for c in cs) else np.concatenate(cs)
        return np.concatenate(xs), np.concatenate(ys), coarse

    train_x, train_y, train_c = join(src.train)
    test_x, test_y, test_c = join(src.test)
    coarse_of = None
    if train_c is not None and test_c is not None:
        coarse_of = _coarse_of(
            np.concatenate([train_y, test_y]), np.concatenate([train_c, test_c]), src.num_classes, name
        )
    return _from_uint8(
        name,
        train_x,
        train_y,
        test_x,
        test_y,
        src.num_classes,
        scale=255.0,
        augment=True,
        flip=True,
        coarse_of=coarse_of,
    )


def _archive_problem(archive: Path, error: Exception, src) -> str:
    """One line on a CIFAR archive that could not be read: what is wrong with it, and what to do."""
    detail = (getattr(error, "strerror", None) or str(error)).strip() or type(error).__name__
    remedy = f"delete it and pass --download to fetch {src.url}, or pass --data DIR for a directory with the right one"
    try:
        with open(archive, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        return f"{archive}: could not be read ({e.strerror or e})"
    if magic != b"\x1f\x8b":
        return f"{archive}: not a gzip-compressed tar archive (it does not begin with gzip's bytes 1f 8b); {remedy}"
    if isinstance(error, EOFError) or "unexpected end" in detail:
        return f"{archive}: truncated (the archive ends before its data does: {detail}); {remedy}"
    if isinstance(error, (zlib.error, gzip.BadGzipFile)):
        return f"{archive}: a damaged gzip stream ({detail}); {remedy}"
    if isinstance(error, tarfile.TarError):
        return f"{archive}: gzip-compressed, but no tar archive inside ({detail}); {remedy}"
    return f"{archive}: could not be read ({detail})"


CIFAR_MEMBER_BYTES = 256 << 20
"""The largest batch file read (CIFAR-100's train batch is 155 MB): a larger one is refused before
it is read."""


def _check_member_size(size: int, where: str) -> None:
    if size > CIFAR_MEMBER_BYTES:
        raise ValueError(f"{where}: {size:,} bytes, more than any CIFAR batch ({CIFAR_MEMBER_BYTES >> 20} MiB)")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds and nothing else: dicts, lists, bytes, strings and numbers
    (built in by the pickle opcodes themselves) and numpy arrays. Any other global a pickle names,
    the way a payload calls code, raises UnpicklingError before it is looked up."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }  # how a protocol-2 pickle written by Python 3 spells bytes

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def _cifar_batch(blob: bytes, where, src, member):
    """(x uint8 (N, 3, 32, 32), y int64 (N,), coarse int64 (N,) or None) from one pickled batch.

    No code from the file runs: its MD5 must be the published one of that batch
    (``_CifarSource.members_md5``) before it is unpickled, and the unpickler admits only the types a
    batch holds (``_BatchUnpickler``).
    """
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    if digest != src.members_md5[member]:
        raise ValueError(
            f"{where}: MD5 {digest} differs from the published {src.members_md5[member]} of "
            f"{member}; not the CIFAR file, so it is not unpickled (pickles can run code). "
            f"Delete it and pass --download to fetch the archive"
        )
    try:
        d = _BatchUnpickler(io.BytesIO(blob), encoding="bytes").load()
        data, labels = d[b"data"], d[src.label_key]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(
            f"{where}: not a CIFAR batch (a pickled dict with b'data' and {src.label_key!r}): {e!r}"
        ) from None
    x = np.asarray(data)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: b'data' must be uint8 (N, 3072), got {x.dtype} {x.shape}")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (x.shape[0],):
        raise ValueError(f"{where}: {y.shape[0]} labels for {x.shape[0]} images")
    coarse = d.get(b"coarse_labels")
    coarse = None if coarse is None else np.asarray(coarse, dtype=np.int64)
    return x.reshape(-1, 3, 32, 32), y, coarse


def _coarse_of(y, coarse, num_classes, name):
    """The super-class of every class, checked to be one per class; -1 for a class with no sample."""
    table = np.full(num_classes, -1, dtype=np.int64)
    table[y] = coarse
    if not np.array_equal(table[y], coarse):
        raise ValueError(f"{name}: b'coarse_labels' give some class more than one super-class")
    return torch.from_numpy(table)


def _download(url, dest: Path, md5: str):
    """Stream url to dest through dest.part, and keep it only if its MD5 is ``md5``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    try:
        try:
            with urllib.request.urlopen(url) as r, open(part, "wb") as f:
                while chunk := r.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except OSError as e:  # no network (URLError), a refused request (HTTPError), a full disk (ENOSPC)
            reason = getattr(e, "reason", None) or e.strerror or e
            raise RuntimeError(f"--download: could not fetch {url} into {part}: {reason}") from None
        if digest.hexdigest() != md5:
            raise RuntimeError(
                f"{url}: MD5 {digest.hexdigest()} differs from the published {md5}; "
                f"the download is corrupt and was deleted"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- Gaussian mixture


def gaussian_mixture(
    n_per_cluster: int = 500,
    clusters: int = 8,
    dim: int = 32,
    sigma2: float = 4.0,
    tau2: float | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian mixture of paper 000 appendix B (features, original labels).

    Cluster c has a mean mu_c ~ N(0, sigma2 I) and samples x ~ N(mu_c, I); the label is c. Training
    uses the coarse labels of paper 000 eq. 4 with K = clusters / 2 super-classes (two clusters per
    super-class), ``coarse_labels(y, clusters // 2)``: cluster c shares its super-class with c + K.

    tau2 (appendix B.1, "similar" sub-classes): when given, the first K // 2 super-classes get a
    shared centre mu ~ N(0, sigma2 I) and both of their cluster means are drawn from N(mu, tau2 I),
    so a small tau2 makes their two sub-classes similar; the other super-classes keep independent
    means (dissimilar sub-classes). Everything else (the dissimilar means, the noise, the order) is
    the same draw as with tau2=None for the same seed.

    The appendix uses 8 clusters of 500 samples and sigma2 = 4 in B.1; it varies the input dimension
    without stating a default, so dim = 32 here is our choice.

    Returns:
        features float32 (clusters * n_per_cluster, dim) and labels int64, in a seeded random order.
    """
    if int(clusters) < 2 or int(clusters) % 2:
        raise ValueError(f"clusters: must be an even number >= 2 (two per super-class), got {clusters}")
    if int(n_per_cluster) < 1:
        raise ValueError(f"n_per_cluster: must be >= 1, got {n_per_cluster}")
    if int(dim) < 1:
        raise ValueError(f"dim: must be >= 1, got {dim}")
    if not sigma2 >= 0:
        raise ValueError(f"sigma2: must be >= 0, got {sigma2}")
    if tau2 is not None and not tau2 >= 0:
        raise ValueError(f"tau2: must be >= 0 or None, got {tau2}")
    clusters, n_per_cluster, dim = int(clusters), int(n_per_cluster), int(dim)
    g = torch.Generator().manual_seed(int(seed))
    means = torch.randn(clusters, dim, generator=g, dtype=torch.float64) * math.sqrt(sigma2)
    labels = torch.arange(clusters).repeat_interleave(n_per_cluster)
    noise = torch.randn(labels.numel(), dim, generator=g, dtype=torch.float64)
    order = torch.randperm(labels.numel(), generator=g)
    if tau2 is not None:
        k = clusters // 2
        superclass = coarse_labels(torch.arange(clusters), k)
        for s in range(k // 2):
            members = (superclass == s).nonzero().flatten()
            centre = torch.randn(dim, generator=g, dtype=torch.float64) * math.sqrt(sigma2)
            means[members] = centre + math.sqrt(tau2) * torch.randn(
                members.numel(), dim, generator=g, dtype=torch.float64
            )
    x = means[labels] + noise
    return x[order].to(torch.float32), labels[order]


def _gmm(seed, options) -> Dataset:
    options = {"n_per_cluster": 625, **options}
    x, y = gaussian_mixture(seed=seed, **options)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y.numpy(), random_state=seed)
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    return Dataset(
        train_x=x[train],
        train_y=y[train],
        test_x=x[test],
        test_y=y[test],
        num_classes=int(y.max()) + 1,
        name="gmm",
        augment=False,
        flip=False,
    )


# ------------------------------------------------------------------------------------------- batches


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True):
    """Random crop with zero padding, and optionally a random horizontal flip, of a (B, C, H, W) batch.

    Each image is padded by ``pad`` zeros on every side and cut back to H x W at an offset drawn
    uniformly from {0..2 pad} per axis; with ``flip`` it is then mirrored left-right with probability
    1/2. All images at once on x's device (one gather, no per-image loop). The random numbers come
    from ``generator`` (drawn on its device), so the result is fixed by the generator's state.
    pad=0 with flip=False returns a copy of x.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x: must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if int(pad) < 0:
        raise ValueError(f"pad: must be >= 0, got {pad}")
    pad = int(pad)
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=generator.device)
    offsets = offsets.to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H) into the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    if flip:
        mirror = torch.randint(0, 2, (b,), generator=generator, device=generator.device)
        mirror = mirror.to(device=x.device, dtype=torch.bool)
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def batches(
    n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True, drop_last: bool = False
):
    """Yield int64 index tensors covering range(n) in batches of ``batch_size``.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (on its device, where the
    indices then live); otherwise it is 0..n-1 on the CPU. The last batch may be short unless
    ``drop_last``.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    n, batch_size = int(n), int(batch_size)
    if shuffle:
        if generator is None:
            raise ValueError("generator: needed when shuffle=True")
        order = torch.randperm(n, generator=generator, device=generator.device)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
