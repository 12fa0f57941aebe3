"""The trainer under torchrun: two gloo ranks train with DDP on digits, write the outputs once, and
measure what one process measures on the same checkpoint (rel 1e-9); a rank SIGKILLed mid-epoch
under --max-restarts 1 restarts from the last checkpoint and ends where an uninterrupted run does."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ncfast.train._faults import FAULT_ENV
from ncfast.train.trainer import Config, Trainer, finite

pytestmark = pytest.mark.slow  # end to end: `pytest -m "not slow"` leaves it out

ARGS = [
    "--dataset",
    "digits",
    "--arch",
    "mlp",
    "--width",
    "32",
    "--epochs",
    "3",
    "--metrics-every",
    "1",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--clp-embed",
    "none",
    "--no-progress",
    "--resume",
]


def _torchrun(out, *extra, env_extra=None, restarts=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    env.update(env_extra or {})
    # --standalone: c10d rendezvous on a free local port, which a restart (--max-restarts) joins afresh
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(restarts),
        "-m",
        "ncfast.train",
        *ARGS,
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a, b, what):
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _close(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{what}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), what
    else:
        assert a == b, what


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    clean = _torchrun(root / "clean")
    assert clean.returncode == 0, clean.stderr[-8000:]
    # rank 1 kills itself before step 5 of epoch 2; torchrun restarts both ranks, which resume
    faulty = _torchrun(root / "faulty", env_extra={FAULT_ENV: "1:2:5"}, restarts=1)
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    return root, clean, faulty


def test_ddp_run_writes_its_outputs_once(runs):
    root, clean, _ = runs
    out = root / "clean"
    assert [r["epoch"] for r in _records(out)] == [0, 1, 2, 3]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["config"]["epochs"] == 3
    # one line per epoch: rank 0 alone prints
    assert sum(line.startswith("epoch   2 ") for line in clean.stdout.splitlines()) == 1
    assert (out / "figures" / "nc_curves.png").exists()


def test_ddp_metrics_equal_one_process_on_the_same_checkpoint(runs, tmp_path):
    """The last measured record (two ranks, each measuring its shard, merged) against one process
    measuring the checkpoint's model on all the data."""
    root, _, _ = runs
    out = root / "clean"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = Config(**{**state["config"], "out": str(tmp_path / "one"), "resume": False, "progress": False})
    trainer = Trainer(cfg)
    assert not trainer.ranks.active
    trainer.model.load_state_dict(state["model"])
    layers, _, _, accuracy = trainer.measure()
    last = _records(out)[-1]
    assert last["epoch"] == 3
    want = json.loads(json.dumps(finite(layers)))  # the same JSON round trip as metrics.jsonl
    _close(want, last["layers"], "layers")
    assert last["train_acc"] == accuracy["train"] and last["test_acc"] == accuracy["test"]


def test_sigkilled_rank_restarts_from_the_checkpoint_and_ends_as_an_uninterrupted_run(runs):
    root, _, faulty = runs
    assert "resumed from" in faulty.stderr  # the restarted ranks loaded the last checkpoint
    got, want = _records(root / "faulty"), _records(root / "clean")
    assert [r["epoch"] for r in got] == [0, 1, 2, 3]
    for a, b in zip(got, want):
        _close(
            {k: v for k, v in a.items() if k != "seconds"},
            {k: v for k, v in b.items() if k != "seconds"},
            f"epoch {a['epoch']}",
        )
    hist = [json.loads(line) for line in (root / "faulty" / "history.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (root / "clean" / "history.jsonl").read_text().splitlines()]
    assert [(r["train_loss"], r["train_acc"], r["test_acc"]) for r in hist] == [
        (r["train_loss"], r["train_acc"], r["test_acc"]) for r in ref
    ]
