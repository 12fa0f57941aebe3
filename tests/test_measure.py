"""python -m ncfast.measure: metrics of saved features, streamed in blocks, equal nc_metrics on the
same arrays (rel 1e-9; NCC counts exactly), from one file or a directory of shards in any of the
three formats, in one process or two (torchrun), with a peak memory that does not grow with N."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import ncfast
from helpers import assert_close
from ncfast import measure as ms


def _data(n=600, d=12, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    y[:c] = torch.arange(c)
    x = (torch.randn(c, d, generator=g) * 3)[y] + torch.randn(n, d, generator=g)
    w = torch.randn(c, d, generator=g)
    b = torch.randn(c, generator=g)
    return x.float(), y, w, b


def _save_safetensors(path, array: np.ndarray):
    """A one-tensor .safetensors file (the format's header: 8-byte length, JSON, raw data)."""
    code = {
        np.dtype(np.float16): "F16",
        np.dtype(np.float32): "F32",
        np.dtype(np.float64): "F64",
        np.dtype(np.int64): "I64",
        np.dtype(np.int32): "I32",
    }[array.dtype]
    data = np.ascontiguousarray(array).tobytes()
    header = json.dumps(
        {
            "x": {"dtype": code, "shape": list(array.shape), "data_offsets": [0, len(data)]},
            "__metadata__": {"by": "test"},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)


def _save(path, array):
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.suffix == ".pt":
        torch.save(torch.from_numpy(np.ascontiguousarray(array)), path)
    else:
        _save_safetensors(path, array)


def _compare(got, want, keys=None):
    keys = keys or want.keys()
    assert set(keys) <= set(got)
    for k in keys:
        if k in ("ncc_accuracy", "ncc_mismatch", "rank"):
            assert got[k] == want[k], k  # counts: exact
        else:
            assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, what=k)


def test_one_file_equals_nc_metrics(tmp_path):
    x, y, w, b = _data()
    sup = torch.tensor([0, 0, 1, 1, 1])
    ood = torch.randn(50, 12, generator=torch.Generator().manual_seed(9)).float() + 1
    for name, arr in (
        ("x.npy", x.numpy()),
        ("y.npy", y.numpy()),
        ("w.npy", w.numpy()),
        ("b.npy", b.numpy()),
        ("s.npy", sup.numpy()),
        ("ood.npy", ood.numpy()),
    ):
        np.save(tmp_path / name, arr)
    timings = {}
    got, m = ms.measure(
        tmp_path / "x.npy",
        tmp_path / "y.npy",
        weight=tmp_path / "w.npy",
        bias=tmp_path / "b.npy",
        superclass=tmp_path / "s.npy",
        ood=tmp_path / "ood.npy",
        block_rows=64,
        timings=timings,
    )
    assert list(timings) == ["labels", "moments", "ood", "ncc", "metrics"] and all(t >= 0 for t in timings.values())
    want = ncfast.nc_metrics(x, y, weight=w, bias=b, superclass=sup, ood_features=ood)
    _compare(got, want)
    for k, v in want.per_class.items():
        assert_close(got.per_class[k].numpy(), v.numpy(), rtol=1e-9, atol=1e-12, what=f"per_class {k}")
    assert sorted(got.degenerate) == sorted(want.degenerate)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_directory_of_mixed_shards_equals_one_array(tmp_path, dtype):
    """Shards of every format, sorted by name and paired in order, uneven sizes, blocks that cross
    nothing (each block lies in one shard): the same metrics as the concatenated array."""
    x, y, w, b = _data(n=700)
    xs = x.numpy().astype(dtype)
    (tmp_path / "f").mkdir()
    (tmp_path / "l").mkdir()
    cuts = [0, 100, 333, 334, 700]
    suffixes = [".npy", ".pt", ".safetensors", ".npy"]
    for i, (lo, hi, suffix) in enumerate(zip(cuts, cuts[1:], suffixes)):
        _save(tmp_path / "f" / f"part{i:02d}{suffix}", xs[lo:hi])
        _save(tmp_path / "l" / f"part{i:02d}{suffixes[-1 - i]}", y.numpy()[lo:hi])
    (tmp_path / "f" / "README.txt").write_text("not a shard")  # other files are ignored
    got, _ = ms.measure(tmp_path / "f", tmp_path / "l", weight=w, bias=b, block_rows=50)
    # float16 features are measured as float32 (exactly their values)
    ref_x = torch.from_numpy(xs).float() if dtype == np.float16 else torch.from_numpy(xs)
    want = ncfast.nc_metrics(
        ref_x, y, weight=w if dtype == np.float16 else w.double(), bias=b if dtype == np.float16 else b.double()
    )
    _compare(got, want)


def test_held_out_split_against_saved_train_means(tmp_path):
    x, y, w, b = _data(n=400, seed=1)
    xt, yt, _, _ = _data(n=300, seed=2)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    np.save(tmp_path / "xt.npy", xt.numpy())
    np.save(tmp_path / "yt.npy", yt.numpy())
    assert (
        ms.main(
            [str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--save-means", str(tmp_path / "m.npy"), "--no-progress"]
        )
        == 0
    )
    means = np.load(tmp_path / "m.npy")
    assert_close(means, ncfast.class_moments(x, y).means.numpy(), rtol=1e-12, what="saved means")
    got, _ = ms.measure(tmp_path / "xt.npy", tmp_path / "yt.npy", train_means=tmp_path / "m.npy")
    want = ncfast.nc_metrics(xt, yt, class_means=torch.from_numpy(means))
    _compare(got, want)
    assert got["ncc_accuracy"] != ncfast.nc_metrics(xt, yt)["ncc_accuracy"]  # not the split's own means


def test_cli_writes_json_per_class_and_class_distance(tmp_path, capsys):
    x, y, w, b = _data(n=300, c=4)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy().astype(np.int32))
    w6 = torch.cat([w, torch.randn(2, 12, generator=torch.Generator().manual_seed(4))])  # classes 4, 5: absent
    np.save(tmp_path / "w.npy", w6.numpy())
    args = [
        str(tmp_path / "x.npy"),
        str(tmp_path / "y.npy"),
        "--weight",
        str(tmp_path / "w.npy"),
        "--num-classes",
        "6",
        "--json",
        str(tmp_path / "m.json"),
        "--per-class",
        str(tmp_path / "pc.npz"),
        "--class-distance",
        str(tmp_path / "d.npy"),
        "--no-progress",
    ]
    assert ms.main(args) == 0
    table = capsys.readouterr().out
    values = json.loads((tmp_path / "m.json").read_text())
    want = ncfast.nc_metrics(x, y, num_classes=6, weight=w6)
    _compare(values, {k: v for k, v in want.items() if not (isinstance(v, float) and np.isnan(v))})
    assert "nc1" in table and f"{want['nc1']:.6g}" in table
    pc = np.load(tmp_path / "pc.npz")
    assert pc["count"][:4].sum() == 300 and np.isnan(pc["count"][4:]).all()  # classes 4, 5: absent
    assert_close(pc["ncc_mismatch"], want.per_class["ncc_mismatch"].numpy(), rtol=0, what="per-class mismatch")
    d = np.load(tmp_path / "d.npy")
    assert d.shape == (6, 6)
    assert_close(d, ncfast.class_distance(x, y, num_classes=6).numpy(), rtol=1e-9, what="class distance")


def _npy_with_header(header: str) -> bytes:
    raw = header.encode("latin-1")
    raw += b" " * (-(len(raw) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw


@pytest.mark.parametrize(
    "make, args, needle",
    [
        (lambda p: None, ["missing.npy", "y.npy"], "FEATURES"),
        (lambda p: np.save(p / "y2.npy", np.zeros(7, dtype=np.int64)), ["x.npy", "y2.npy"], "LABELS"),
        (lambda p: np.save(p / "yn.npy", np.r_[-1, np.zeros(299, dtype=np.int64)]), ["x.npy", "yn.npy"], "negative"),
        (lambda p: None, ["x.npy", "y.npy", "--num-classes", "3"], "--num-classes"),
        (lambda p: None, ["x.npy", "y.npy", "--bias", "b.npy"], "--bias"),
        (lambda p: np.save(p / "w3.npy", np.zeros((3, 12))), ["x.npy", "y.npy", "--weight", "w3.npy"], "--weight"),
        (lambda p: np.save(p / "yf.npy", np.zeros(300)), ["x.npy", "yf.npy"], "integers"),
        (lambda p: None, ["x.npy", "y.npy", "--block-rows", "0"], "--block-rows"),
        # features that are not floating point, named with their file
        (
            lambda p: np.save(p / "xi.npy", np.zeros((300, 12), dtype=np.int32)),
            ["xi.npy", "y.npy"],
            "xi.npy holds int32",
        ),
        (
            lambda p: np.save(p / "xc.npy", np.zeros((300, 12), dtype=np.complex64)),
            ["xc.npy", "y.npy"],
            "floating-point",
        ),
        (lambda p: np.save(p / "xb.npy", np.zeros((300, 12), dtype=bool)), ["xb.npy", "y.npy"], "floating-point"),
        # .pt files that are empty, truncated or not torch files
        (lambda p: (p / "xe.pt").write_bytes(b""), ["xe.pt", "y.npy"], "xe.pt: not a readable .pt file"),
        (
            lambda p: (
                torch.save(torch.zeros(300, 12), p / "xt.pt"),
                (p / "xt.pt").write_bytes((p / "xt.pt").read_bytes()[:200]),
            ),
            ["xt.pt", "y.npy"],
            "xt.pt: not a readable .pt file",
        ),
        # an output path in a missing directory: refused before the passes
        (lambda p: None, ["x.npy", "y.npy", "--json", "no/such/dir/out.json"], "--json: cannot write"),
        (lambda p: None, ["x.npy", "y.npy", "--per-class", "no/such/dir/pc.npz"], "--per-class: cannot write"),
        # NaN in the features: the file and rows named, and the flag that drops them
        (
            lambda p: np.save(p / "xn.npy", np.r_[np.zeros((5, 12)), np.full((1, 12), np.nan), np.zeros((294, 12))]),
            ["xn.npy", "y.npy"],
            "xn.npy: rows 0 to 299 hold NaN or Inf; pass --nan-policy omit",
        ),
        # not a regular file
        (lambda p: os.mkfifo(p / "fifo.npy"), ["fifo.npy", "y.npy"], "is not a regular file"),
        # one stray label of 2^40: refused before anything is allocated by it
        (
            lambda p: np.save(p / "yh.npy", np.r_[2**40, np.zeros(299, dtype=np.int64)]),
            ["x.npy", "yh.npy"],
            "yh.npy: a label is 1099511627776, so: 1099511627777 classes x 12 features need",
        ),
        (
            lambda p: np.save(p / "yh.npy", np.r_[2**40, np.zeros(299, dtype=np.int64)]),
            ["x.npy", "yh.npy", "--num-classes", "4"],
            "--num-classes: 4, but a label is 1099511627776",
        ),
        (
            lambda p: None,
            ["x.npy", "y.npy", "--num-classes", "1000000000000"],
            "--num-classes: 1000000000000 classes x 12",
        ),
        # labels of no number type, a header numpy's parser chokes on
        (lambda p: np.save(p / "ys.npy", np.array(["a"] * 300)), ["x.npy", "ys.npy"], "ys.npy: holds <U1, not numbers"),
        (
            lambda p: (p / "yt.npy").write_bytes(
                _npy_with_header("{'descr': '<i8', 'fortran_order': False, 'shape': (20, 3\xd1, }")
            ),
            ["x.npy", "yt.npy"],
            "yt.npy: not a readable .npy file",
        ),
        (
            lambda p: np.save(p / "yc.npy", np.zeros(300, dtype=np.complex64)),
            ["x.npy", "yc.npy"],
            "yc.npy holds torch.complex64",
        ),
        # a classifier of integers, a superclass map of floats: the flag and the file named
        (
            lambda p: np.save(p / "wi.npy", np.zeros((4, 12), dtype=np.int32)),
            ["x.npy", "y.npy", "--weight", "wi.npy"],
            "--weight: " + "{tmp}/wi.npy holds torch.int32, expected floating-point values",
        ),
        (
            lambda p: np.save(p / "sf.npy", np.zeros(4)),
            ["x.npy", "y.npy", "--superclass", "sf.npy"],
            "--superclass: " + "{tmp}/sf.npy holds torch.float64, expected integer values",
        ),
        (
            lambda p: np.save(p / "ws.npy", np.zeros((3, 12), dtype=np.float32)),
            ["x.npy", "y.npy", "--weight", "ws.npy"],
            "--weight: " + "{tmp}/ws.npy: expected shape (4, 12), got (3, 12)",
        ),
    ],
)
def test_bad_inputs_are_named(tmp_path, capsys, make, args, needle):
    x, y, _, b = _data(n=300, c=4)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    np.save(tmp_path / "b.npy", b.numpy()[:4])
    make(tmp_path)
    argv = [str(tmp_path / a) if a.endswith((".npy", ".pt")) else a for a in args]
    assert ms.main([*argv, "--no-progress"]) == 2
    assert needle.format(tmp=tmp_path) in capsys.readouterr().err


def _peak_rss_kib(path_x, path_y, block_rows=None):
    code = (
        "import resource, sys; from ncfast import measure as ms; "
        f"ms.measure({str(path_x)!r}, {str(path_y)!r}, block_rows={block_rows}); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return int(out.stdout.strip().splitlines()[-1])


def _write_features(path, n, d, c, dtype, rng):
    x = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, d))
    means = rng.standard_normal((c, d), dtype=np.float32)
    y = np.r_[np.arange(c), rng.integers(0, c, n - c)]  # imbalanced: the exact balanced Sigma_W
    for lo in range(0, n, 20_000):
        hi = min(lo + 20_000, n)
        x[lo:hi] = means[y[lo:hi]] + rng.standard_normal((hi - lo, d), dtype=np.float32)
    x.flush()
    return y


@pytest.mark.parametrize(
    "d, c, dtype, rows, block_rows",
    [
        (256, 10, np.float32, 50_000, 4096),  # 51 MB -> 205 MB, blocks of 4 MB
        (1024, 1000, np.float16, 12_000, 4096),  # 25 MB -> 98 MB; C x D float64 temporaries of 8 MB
    ],
)
@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_file(tmp_path, d, c, dtype, rows, block_rows):
    """A file 4x larger raises the peak RSS by far less than the bytes it adds: each block's pages
    leave the process once it is measured (file pages and the heap's freed chunks alike)."""
    rng = np.random.default_rng(0)
    for scale in (1, 4):
        y = _write_features(tmp_path / f"x{scale}.npy", rows * scale, d, c, dtype, rng)
        np.save(tmp_path / f"y{scale}.npy", y)
    small = _peak_rss_kib(tmp_path / "x1.npy", tmp_path / "y1.npy", block_rows)
    large = _peak_rss_kib(tmp_path / "x4.npy", tmp_path / "y4.npy", block_rows)
    added_file = 3 * rows * d * np.dtype(dtype).itemsize / 1024
    print(f"peak RSS {small} KiB -> {large} KiB for {added_file:.0f} KiB more file")
    assert large - small < 0.15 * added_file, (small, large, added_file)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    x, y, w, b = _data(n=900, c=6, seed=3)
    (tmp_path / "f").mkdir()
    (tmp_path / "l").mkdir()
    for i, (lo, hi) in enumerate([(0, 250), (250, 600), (600, 900)]):
        np.save(tmp_path / "f" / f"{i}.npy", x.numpy()[lo:hi])
        np.save(tmp_path / "l" / f"{i}.npy", y.numpy()[lo:hi])
    np.save(tmp_path / "w.npy", w.numpy())
    common = [
        str(tmp_path / "f"),
        str(tmp_path / "l"),
        "--weight",
        str(tmp_path / "w.npy"),
        "--block-rows",
        "100",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "ncfast.measure",
            *common,
            "--json",
            str(tmp_path / "two.json"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    subprocess.run(
        [sys.executable, "-m", "ncfast.measure", *common, "--json", str(tmp_path / "one.json")],
        check=True,
        env=env,
        capture_output=True,
    )
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert set(two) == set(one)
    for k, v in one.items():
        if v is None:
            assert two[k] is None, k
        else:
            assert two[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    _compare(one, {k: v for k, v in ncfast.nc_metrics(x, y, weight=w).items() if not np.isnan(v)})


def _safetensors_bytes(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


_I64 = np.arange(40, dtype=np.int64).tobytes()  # 320 bytes


@pytest.mark.parametrize(
    "blob, needle",
    [
        # a dtype x shape that does not match data_offsets (I32 declared over I64 bytes)
        (
            _safetensors_bytes({"y": {"dtype": "I32", "shape": [40], "data_offsets": [0, 320]}}, _I64),
            "data_offsets span",
        ),
        # offsets past the end of the file
        (_safetensors_bytes({"y": {"dtype": "I64", "shape": [80], "data_offsets": [0, 640]}}, _I64), "truncated"),
        # a hole before the tensor
        (_safetensors_bytes({"y": {"dtype": "I64", "shape": [39], "data_offsets": [8, 320]}}, _I64), "hole"),
        # bytes left after the tensor
        (_safetensors_bytes({"y": {"dtype": "I64", "shape": [39], "data_offsets": [0, 312]}}, _I64), "left over"),
        # malformed headers
        ((2**63).to_bytes(8, "little") + b"{}", "not a safetensors file"),
        (_safetensors_bytes(b"[1, 2]", _I64), "not an object"),
        (_safetensors_bytes(b"\xff\xfe{", _I64), "not JSON"),
        (_safetensors_bytes({"y": {"shape": [40], "data_offsets": [0, 320]}}, _I64), "needs dtype"),
        (_safetensors_bytes({"y": {"dtype": "I64", "shape": ["40"], "data_offsets": [0, 320]}}, _I64), "shape"),
        (_safetensors_bytes({"y": {"dtype": "I64", "shape": [40], "data_offsets": [-8, 320]}}, _I64), "data_offsets"),
    ],
)
def test_safetensors_that_disagree_with_themselves_are_refused(tmp_path, blob, needle):
    """Every header is checked against itself and the file's size before anything is read or
    allocated by it (an I32 tensor declared over I64 bytes was read: nc1 1.88 for 0.44)."""
    (tmp_path / "y.safetensors").write_bytes(blob)
    with pytest.raises(ValueError, match=needle) as err:
        ms.open_shards(tmp_path / "y.safetensors", "LABELS")
    assert "y.safetensors" in str(err.value)


def test_npy_header_larger_than_its_file_is_refused_before_allocating(tmp_path):
    """A 200-byte .npy claiming 2^55 rows reached 5 GB before failing; a stray AppleDouble '._x.npy'
    gave numpy's bare 'magic string is not correct'. Under a 6 GiB address-space cap (importing
    torch takes most of it), both are ValueErrors naming the file."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 4), dtype=np.float32))
    header["shape"] = (2**55, 4)
    with open(tmp_path / "x.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    (tmp_path / "._y.npy").write_bytes(b"\x00\x05\x16\x07" + b"\0" * 60)
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
        "from ncfast import measure as ms\n"
        "for name in ('x.npy', '._y.npy'):\n"
        "    try:\n"
        f"        ms.open_shards({str(tmp_path)!r} + '/' + name, 'FEATURES')\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out
    assert "x.npy" in lines[0] and "truncated" in lines[0]
    assert "._y.npy" in lines[1] and "not a readable .npy file" in lines[1]


def test_shards_pair_by_their_numbers_not_their_sorted_names(tmp_path):
    """x_1, x_2, x_10 against y_01, y_02, y_10: sorted by name, x_10 met y_02 (nc1 15.6 for 0.42).
    Natural order pairs them right; shards whose names share neither stem nor numbers are refused."""
    x, y, w, b = _data(n=600)
    (tmp_path / "f").mkdir()
    (tmp_path / "l").mkdir()
    cuts = {1: (0, 150), 2: (150, 400), 10: (400, 600)}
    for k, (lo, hi) in cuts.items():
        np.save(tmp_path / "f" / f"x_{k}.npy", x.numpy()[lo:hi])
        np.save(tmp_path / "l" / f"y_{k:02d}.npy", y.numpy()[lo:hi])
    got, _ = ms.measure(tmp_path / "f", tmp_path / "l")
    _compare(got, ncfast.nc_metrics(x, y))
    (tmp_path / "l" / "y_10.npy").rename(tmp_path / "l" / "y_11.npy")
    with pytest.raises(ValueError, match="y_11.npy is paired with .*x_10.npy"):
        ms.measure(tmp_path / "f", tmp_path / "l")
    # names without numbers pair by stem only: x_a with y_b was taken (both have no numbers)
    for d in ("f", "l"):
        for p in (tmp_path / d).iterdir():
            p.unlink()
    for stem_x, stem_y, (lo, hi) in (("x_a", "y_b", (0, 300)), ("x_c", "y_d", (300, 600))):
        np.save(tmp_path / "f" / f"{stem_x}.npy", x.numpy()[lo:hi])
        np.save(tmp_path / "l" / f"{stem_y}.npy", y.numpy()[lo:hi])
    with pytest.raises(ValueError, match="y_b.npy is paired with .*x_a.npy"):
        ms.measure(tmp_path / "f", tmp_path / "l")


def test_big_endian_npy_is_read_in_native_order(tmp_path):
    """A big-endian .npy (valid, written by np.save of a '>f4' array) is measured as its values; it
    stopped with torch's 'byte order different from the native byte order', naming no file."""
    x, y, w, b = _data(n=300, c=4)
    np.save(tmp_path / "x.npy", x.numpy().astype(">f4"))
    np.save(tmp_path / "y.npy", y.numpy().astype(">i8"))
    got, _ = ms.measure(tmp_path / "x.npy", tmp_path / "y.npy")
    _compare(got, ncfast.nc_metrics(x, y))


@pytest.mark.parametrize("held_out", [False, True])
def test_nan_policy_omit_measures_the_rows_kept(tmp_path, capsys, held_out):
    """--nan-policy omit drops rows holding NaN or +-Inf (with their labels) in every pass, over
    several shards and blocks, and reports how many: the metrics are those of the rows kept. With
    --train-means (one pass) the announced class counts are the kept rows' counts, so the balanced
    Sigma_W stays exact although the dropped rows make the classes imbalanced."""
    x, y, w, b = _data(n=500, c=4, seed=5)
    bad = torch.tensor([3, 77, 78, 260, 499])
    for i, v in zip(bad, (float("nan"), float("inf"), -float("inf"), float("nan"), float("nan"))):
        x[i, int(i) % 12] = v
    keep = torch.ones(500, dtype=torch.bool)
    keep[bad] = False
    (tmp_path / "f").mkdir()
    (tmp_path / "l").mkdir()
    for i, (lo, hi) in enumerate([(0, 200), (200, 500)]):
        np.save(tmp_path / "f" / f"x_{i}.npy", x.numpy()[lo:hi])
        np.save(tmp_path / "l" / f"y_{i}.npy", y.numpy()[lo:hi])
    args = [
        str(tmp_path / "f"),
        str(tmp_path / "l"),
        "--block-rows",
        "64",
        "--no-progress",
        "--weight",
        str(tmp_path / "w.npy"),
        "--json",
        str(tmp_path / "out.json"),
    ]
    np.save(tmp_path / "w.npy", w.numpy())
    kw = {}
    if held_out:
        xt, yt, _, _ = _data(n=300, c=4, seed=6)
        means = torch.stack([xt[yt == k].double().mean(0) for k in range(4)])
        np.save(tmp_path / "m.npy", means.numpy())
        args += ["--train-means", str(tmp_path / "m.npy")]
        kw = {"class_means": means}
    assert ms.main(args) == 2  # raise, the default
    assert "pass --nan-policy omit" in capsys.readouterr().err
    assert ms.main([*args, "--nan-policy", "omit"]) == 0
    assert "5 rows holding NaN or Inf omitted" in capsys.readouterr().err
    got = json.loads((tmp_path / "out.json").read_text())
    want = ncfast.nc_metrics(x[keep], y[keep], weight=w, **kw)
    _compare(got, {k: v for k, v in want.items() if not np.isnan(v)})
    out, _ = ms.measure(
        tmp_path / "f",
        tmp_path / "l",
        nan_policy="omit",
        block_rows=64,
        train_means=tmp_path / "m.npy" if held_out else None,
    )
    assert out.omitted_rows == 5


@pytest.mark.slow
def test_torchrun_bad_shard_is_reported_by_its_rank(tmp_path):
    """A NaN in a block dealt to rank 1: rank 1 names the file and rows, rank 0 says which rank
    stopped (no gloo traceback from a rank left waiting in a collective), and torchrun's root cause is
    rank 1."""
    x, y, _, _ = _data(n=900, c=6, seed=7)
    x[605, 2] = float("nan")  # shard 2 (rows 600-899), its first block of 100: block 7 of 10, rank 1's
    (tmp_path / "f").mkdir()
    (tmp_path / "l").mkdir()
    for i, (lo, hi) in enumerate([(0, 250), (250, 600), (600, 900)]):
        np.save(tmp_path / "f" / f"{i}.npy", x.numpy()[lo:hi])
        np.save(tmp_path / "l" / f"{i}.npy", y.numpy()[lo:hi])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "ncfast.measure",
            str(tmp_path / "f"),
            str(tmp_path / "l"),
            "--block-rows",
            "100",
            "--no-progress",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert f"error: rank 1: FEATURES: {tmp_path / 'f' / '2.npy'}: rows 0 to 99 hold NaN or Inf" in r.stderr
    assert "error: rank 1 stopped" in r.stderr  # rank 0's line
    assert "gloo" not in r.stderr.lower() and "Connection closed" not in r.stderr
    cause = r.stderr.split("Root Cause")[1]
    assert "rank      : 1" in cause and "exitcode  : 2" in cause
