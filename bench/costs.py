"""What measuring costs a user, as a ratio to the work the user cannot avoid (``bench/run.py --ops
probe,dxd``).

probe  ``LayerProbe.measure`` of a CIFAR-style ResNet-18 (width 16) on 32 x 32 inputs, layers
       layer1, layer2 and pool (layer1 and layer2 are wider than max_dim: their D x D metrics come
       from the channel means), C = 10, batches of 128 from a ``DataLoader``, against one plain
       ``torch.no_grad()`` forward pass of the same model over the same loader:

       train           a split measured without class means, its layers' outputs kept
                       (``cache_bytes``, 1 GiB): one forward pass
       train, uncached the same with ``cache_bytes=0``: the second pass runs the model again
       held-out        a split scored against the train split's class means
                       (``class_means=``): one forward pass; without ``class_counts`` the labels
                       are counted first by a pass over the loader that does not run the model

dxd    ``nc_metrics`` (C = 10) against float64 X^T X (``torch.mm`` of the float64 features, the
       conversion not counted) plus one ``eigvalsh`` of a D x D symmetric matrix: the Gram
       matrix every D x D metric needs and one symmetric eigenvalue problem of its size.

Every row times ncfast and its floor in turns (``repeat`` times, after ``warmup`` runs of each; the
probe's three cases and both forward passes in one series), so a burst of background load hits
them alike; ratio = ncfast median / floor median, ``ratio_of_min`` the same of the fastest runs, and
``ratio_paired`` the median over the turns of each turn's ncfast time over the floor timed in the
same turn (paired, so a slow spell of the machine that spans a turn moves both).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import ncfast

PRESETS = {
    "quick": {"probe": [256], "dxd": [(256, 256), (2_000, 256), (256, 512)]},
    "default": {"probe": [1024], "dxd": [(n, d) for n in (256, 20_000) for d in (1024, 2048, 4096)]},
    "full": {"probe": [1024, 4096], "dxd": [(n, d) for n in (256, 20_000) for d in (1024, 2048, 4096)]},
    "h100": {"probe": [1024, 16_384], "dxd": [(n, d) for n in (256, 20_000, 200_000) for d in (1024, 2048, 4096)]},
}
PROBE_LAYERS = ["layer1", "layer2", "pool"]
CLASSES = 10
BATCH = 128


def _turns(fns: dict, warmup: int, repeat: int, sync) -> dict:
    """{name: (median seconds, min seconds, seconds of each turn)}: every function runs ``warmup``
    times, then they take turns."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
            sync()
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t), t) for name, t in times.items()}


def _row(op: str, case: str, ours: tuple, floor: tuple, floor_name: str, **extra) -> dict:
    paired = statistics.median(a / b for a, b in zip(ours[2], floor[2]))
    return dict(
        op=op,
        case=case,
        ncfast_s=ours[0],
        floor_s=floor[0],
        ratio=ours[0] / floor[0],
        ncfast_min_s=ours[1],
        floor_min_s=floor[1],
        ratio_of_min=ours[1] / floor[1],
        ratio_paired=paired,
        floor=floor_name,
        **extra,
    )


def probe_rows(n: int, device: torch.device, warmup: int, repeat: int, sync) -> list[dict]:
    """The probe rows at N = n (train and held-out splits of n images each)."""
    from torch.utils.data import DataLoader, TensorDataset

    from ncfast.train.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", CLASSES, 3, input_size=32, width=16).to(device).eval()
    g = torch.Generator().manual_seed(1)
    loaders = {}
    for split in ("train", "test"):
        y = torch.arange(n) % CLASSES
        x = torch.randn(n, 3, 32, 32, generator=g) + torch.randn(CLASSES, 3, 1, 1, generator=g)[y]
        loaders[split] = DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=BATCH)

    def forward(loader):
        def run():
            with torch.no_grad():
                for xb, _ in loader:
                    model(xb)

        return run

    train_means = ncfast.LayerProbe(model, PROBE_LAYERS, CLASSES).measure(loaders["train"]).class_means
    cached = ncfast.LayerProbe(model, PROBE_LAYERS, CLASSES)
    uncached = ncfast.LayerProbe(model, PROBE_LAYERS, CLASSES, cache_bytes=0)
    kept = cached.measure(loaders["train"]).cached_layers
    cases = {
        "train": lambda: cached.measure(loaders["train"]),
        "train, uncached": lambda: uncached.measure(loaders["train"]),
        "held-out": lambda: cached.measure(loaders["test"], class_means=train_means),
    }
    print(f"    probe N={n}", file=sys.stderr)
    # every case and both splits' forward passes take turns in one series, so that every ratio
    # divides by the same forward times
    t = _turns(
        {**cases, "forward train": forward(loaders["train"]), "forward test": forward(loaders["test"])},
        warmup,
        repeat,
        sync,
    )
    return [
        _row(
            "probe",
            name,
            t[name],
            t["forward test" if name == "held-out" else "forward train"],
            "one forward pass",
            N=n,
            cached_layers=kept if name == "train" else [],
        )
        for name in cases
    ]


def dxd_row(n: int, d: int, device: torch.device, warmup: int, repeat: int, sync) -> dict:
    """nc_metrics at (n, d) against float64 X^T X + eigvalsh(D)."""
    g = torch.Generator().manual_seed(2)
    y = (torch.arange(n) % CLASSES)[torch.randperm(n, generator=g)]
    x = torch.relu(torch.randn(CLASSES, d, generator=g)[y] * 0.5 + torch.randn(n, d, generator=g)).to(device)
    y = y.to(device)
    x64 = x.to(torch.float64)
    gram = x64.T @ x64 + torch.eye(d, dtype=torch.float64, device=device)
    print(f"    dxd N={n} D={d}", file=sys.stderr)
    t = _turns(
        {
            "ncfast": lambda: ncfast.nc_metrics(x, y),
            "xtx": lambda: x64.T @ x64,
            "eigvalsh": lambda: torch.linalg.eigvalsh(gram),
        },
        warmup,
        repeat,
        sync,
    )
    floor = (
        t["xtx"][0] + t["eigvalsh"][0],
        t["xtx"][1] + t["eigvalsh"][1],
        [a + b for a, b in zip(t["xtx"][2], t["eigvalsh"][2])],
    )
    return _row(
        "dxd",
        "nc_metrics",
        t["ncfast"],
        floor,
        "float64 X^T X + eigvalsh(D)",
        N=n,
        D=d,
        C=CLASSES,
        xtx_s=t["xtx"][0],
        eigvalsh_s=t["eigvalsh"][0],
    )


def run(ops, preset: str, device: torch.device, warmup: int, repeat: int, sync) -> list[dict]:
    sizes = PRESETS.get(preset, PRESETS["default"])
    rows = []
    if "probe" in ops:
        for n in sizes["probe"]:
            rows += probe_rows(n, device, warmup, repeat, sync)
    if "dxd" in ops:
        for n, d in sizes["dxd"]:
            rows.append(dxd_row(n, d, device, warmup, repeat, sync))
    return rows


def print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    print()
    print("What measuring costs: ncfast's time as a ratio to the work the user cannot avoid")
    line = (
        f"{'op':<6}  {'case':<16}  {'N':>7}  {'D':>5}  {'ncfast s':>9}  {'floor s':>8}  {'ratio':>6}  "
        f"{'of min':>6}  {'paired':>6}  floor"
    )
    print(line)
    print("-" * (len(line) + 26))
    for r in rows:
        d = r.get("D", "")
        print(
            f"{r['op']:<6}  {r['case']:<16}  {r['N']:>7}  {d:>5}  {r['ncfast_s']:>9.3f}  {r['floor_s']:>8.3f}  "
            f"{r['ratio']:>6.2f}  {r['ratio_of_min']:>6.2f}  {r['ratio_paired']:>6.2f}  {r['floor']}"
            + (f" (X^T X {r['xtx_s']:.3f} s, eigvalsh {r['eigvalsh_s']:.3f} s)" if r["op"] == "dxd" else "")
        )
    print(
        "seconds and ratio: medians; of min: the ratio of the fastest runs of each (less moved by background "
        "load); paired: the median of each turn's ratio"
    )
