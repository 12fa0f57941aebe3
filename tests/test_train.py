"""The reference trainer end to end on tiny runs of every data kind, resume, label transforms and
the metrics.jsonl schema. Data files are written by the tests (nothing is downloaded)."""

import dataclasses
import errno
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ncfast
from ncfast.train.__main__ import main, parse_args
from ncfast.train.trainer import Config, Trainer, flag_of, transform_labels
from test_train_data import make_idx_dir, write_cifar

METRICS = {
    "nc1",
    "nc2_etf",
    "cdnv",
    "vci",
    "rank",
    "effective_rank",
    "ncc_mismatch",
    "ncc_accuracy",
    "logits_norm",
    "feature_norm",
    "equinorm",
    "squared_distance",
    "cosine_separation",
    "msdr",
}


def _tiny(tmp_path, **kw):
    base = dict(
        arch="resnet18",
        width=4,
        epochs=1,
        batch_size=16,
        metrics_every=1,
        clp_embed="pca",
        out=str(tmp_path / "run"),
        progress=False,
        max_dim=16,
    )
    base.update(kw)
    return Config(**base)


def _check_outputs(out, epochs, layers, msdr=True):
    """A run on relabelled data (coarse, fine or random-coarse labels). msdr: whether every
    original class sits inside one training label (not so for fine labels)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(epochs + 1))  # epoch 0 (untrained) included
    for r in lines:
        assert set(r) >= {"epoch", "train_acc", "test_acc", "train_loss", "layers"}
        assert set(r["layers"]) == set(layers)
        for name in layers:
            for split in ("train", "test"):
                m = r["layers"][name][split]
                want = METRICS if msdr else METRICS - {"msdr"}
                assert want <= set(m), want - set(m)
                assert msdr or "msdr" not in m
                assert m["dxd_features"] in ("full", "channel_pooled")
                assert set(m["degenerate"]) <= {"vci", "rank", "effective_rank"}
                assert 0.0 <= m["ncc_mismatch"] <= 1.0 and 0.0 <= m["ncc_accuracy"] <= 1.0
    for e in range(epochs + 1):
        d = np.load(out / "class_distance" / f"epoch_{e:03d}.npy")
        assert d.ndim == 2 and d.shape[0] == d.shape[1]
        every = np.load(out / "class_distance" / f"epoch_{e:03d}_layers.npz")
        assert set(every.files) == {f"{name}/{split}" for name in layers for split in ("train", "test")}
        assert all(every[k].shape == d.shape for k in every.files)
        # the class distance over the training labels (paper 000 fig. 15 under --fine)
        assert (out / "class_distance" / f"epoch_{e:03d}_train_labels.npy").exists()
    summary = json.loads((out / "summary.json").read_text())
    for k in (
        "clp_accuracy",
        "linear_probe_accuracy",
        "train_accuracy",
        "test_accuracy",
        "interpolation_epoch",
        "final_metrics",
        "linear_probe_per_layer",
    ):
        assert k in summary
    # CLP only where a training class holds several original classes: never under fine labels
    assert (summary["clp_accuracy"] is None) == (not msdr)
    assert msdr is False or 0.0 <= summary["clp_accuracy"] <= 1.0
    assert 0.0 <= summary["linear_probe_accuracy"] <= 1.0
    for f in ("class_distance.png", "nc_curves.png", "ncc_mismatch_per_layer.png"):
        assert (out / "figures" / f).stat().st_size > 0
    assert (out / "figures" / "class_distance_train_labels.png").stat().st_size > 0
    return lines, summary


@pytest.mark.slow
def test_digits_coarse_end_to_end(tmp_path):
    cfg = _tiny(tmp_path, dataset="digits", coarse=5, epochs=2, batch_size=128)
    trainer = Trainer(cfg)
    summary = trainer.run()
    lines, _ = _check_outputs(tmp_path / "run", 2, ["layer1", "layer2", "layer3", "layer4", "pool"])
    pool = lines[-1]["layers"]["pool"]["train"]
    assert pool["dxd_features"] == "channel_pooled"  # 32 features > max_dim 16
    assert lines[-1]["layers"]["layer1"]["train"]["dim"] == 4 * 8 * 8
    assert summary["num_train_classes"] == 5 and summary["num_original_classes"] == 10
    # MSDR exists because every original digit sits inside one coarse label
    assert math.isfinite(pool["msdr"])
    assert np.load(tmp_path / "run" / "class_distance" / "epoch_002_train_labels.npy").shape == (5, 5)
    # the test split's NCC is scored against the train split's class means of the same layer
    model = trainer.model.eval()
    for name in ("layer1", "pool"):
        feats, logits = {}, {}
        for split in ("train", "test"):
            store = []
            hook = dict(model.named_modules())[name].register_forward_hook(
                lambda m, i, o: store.append(o.reshape(o.shape[0], -1))
            )
            with torch.no_grad():
                logits[split] = model(trainer.x[split])
            hook.remove()
            feats[split] = store[0]
        train_means = ncfast.class_moments(feats["train"], trainer.y["train"], num_classes=5).means
        want = ncfast.nc_metrics(
            feats["test"], trainer.y["test"], num_classes=5, logits=logits["test"], class_means=train_means
        )
        got = lines[-1]["layers"][name]["test"]
        assert got["ncc_accuracy"] == want["ncc_accuracy"] and got["ncc_mismatch"] == want["ncc_mismatch"]


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.slow
def test_idx_data_end_to_end(tmp_path, name):
    make_idx_dir(tmp_path / "data", gz=True, n_train=40, n_test=20)
    cfg = _tiny(tmp_path, dataset=name, data=str(tmp_path / "data"), arch="mlp", coarse=2)
    Trainer(cfg).run()
    _check_outputs(tmp_path / "run", 1, ["layer1", "layer2"])


@pytest.mark.parametrize("name, layout", [("cifar10", "folder"), ("cifar100", "tar")])
@pytest.mark.slow
def test_cifar_end_to_end(tmp_path, name, layout, monkeypatch):
    write_cifar(tmp_path / "data", name, layout, monkeypatch, n_train=60, n_test=20)
    cfg = _tiny(tmp_path, dataset=name, data=str(tmp_path / "data"), arch="vgg11", random_coarse=3)
    Trainer(cfg).run()
    lines, _ = _check_outputs(tmp_path / "run", 1, ["block1", "block2", "block3", "block4", "block5", "pool"])


@pytest.mark.slow
def test_gmm_fine_labels_end_to_end(tmp_path):
    cfg = _tiny(tmp_path, dataset="gmm", arch="mlp", fine=True, batch_size=256)
    summary = Trainer(cfg).run()
    _check_outputs(tmp_path / "run", 1, ["layer1", "layer2"], msdr=False)
    assert summary["num_train_classes"] == 16
    # paper 000 fig. 15: the 2C x 2C class distance over the fine training labels
    assert np.load(tmp_path / "run" / "class_distance" / "epoch_001_train_labels.npy").shape == (16, 16)


@pytest.mark.slow
def test_resume_reaches_the_same_result(tmp_path, monkeypatch):
    straight = _tiny(tmp_path / "a", dataset="digits", coarse=5, epochs=3, metrics_every=2)
    t = Trainer(straight)
    t.run()
    want = {k: v.clone() for k, v in t.model.state_dict().items()}

    cut = _tiny(tmp_path / "b", dataset="digits", coarse=5, epochs=3, metrics_every=2)
    first = Trainer(cut)
    calls = {"n": 0}
    original = Trainer.train_epoch

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during the second epoch, after the first checkpoint
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    monkeypatch.setattr(Trainer, "train_epoch", original)
    cut.resume = True
    again = Trainer(cut)
    again.run()
    got = again.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    a = (tmp_path / "a" / "run" / "metrics.jsonl").read_text()
    b = (tmp_path / "b" / "run" / "metrics.jsonl").read_text()
    assert a == b


class _Payload:
    """An object whose unpickling creates a file: what a crafted checkpoint can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_with_a_pickle_payload(tmp_path):
    """--resume loads checkpoint.pt with weights_only=True: one that carries a payload (here in its
    history) is refused with a ValueError that names the file, and the payload never runs."""
    cfg = _tiny(tmp_path, dataset="digits", epochs=1)
    Trainer(cfg).run()
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)  # what save() writes loads without a pickle global
    marker = tmp_path / "ran"
    state["history"].append(_Payload(marker))
    torch.save(state, path)
    cfg.resume = True
    with pytest.raises(ValueError, match="--resume: .*checkpoint.pt"):
        Trainer(cfg).run()
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("bit", "fails its integrity check"),  # one flipped bit in a weight
        ("empty", "is not a readable checkpoint"),
        ("truncated", "is not a readable checkpoint"),
        ("garbage", "is not a readable checkpoint"),
        ("missing", r"lacks \['opt'\]"),
        ("list", "holds a list, not a checkpoint"),
        ("wrong type", "does not fit this run's model and optimiser"),
    ],
)
@pytest.mark.slow
def test_resume_refuses_a_damaged_checkpoint_in_one_line(tmp_path, damage, needle):
    """A checkpoint carries the SHA-256 of its contents: a flipped bit is refused, not resumed; an
    empty, truncated or garbage file, a missing key or a wrong type is a ValueError naming the file
    (the CLI prints it on one line and exits 2), never a traceback from inside torch."""
    cfg = _tiny(tmp_path, dataset="digits", epochs=1)
    Trainer(cfg).run()
    path = tmp_path / "run" / "checkpoint.pt"
    raw = path.read_bytes()
    state = torch.load(path, weights_only=True)
    if damage == "bit":
        first = next(iter(state["model"]))
        state["model"][first].view(-1)[0] = torch.nextafter(state["model"][first].view(-1)[0], torch.tensor(1e9))
        torch.save(state, path)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif damage == "missing":
        del state["opt"]
        torch.save(state, path)
    elif damage == "list":
        torch.save([1, 2, 3], path)
    else:  # a wrong type under a valid digest: refused when it is loaded
        from ncfast.train.trainer import _digest

        state["sched"] = [1, 2]
        state["sha256"] = _digest({k: v for k, v in state.items() if k != "sha256"})
        torch.save(state, path)
    cfg.resume = True
    with pytest.raises(ValueError, match=f"^--resume: {re.escape(str(path))} .*({needle})"):
        Trainer(cfg).run()


def test_label_transforms():
    y = torch.arange(10).repeat(3)
    cfg = Config(coarse=5)
    tr, te, k = transform_labels(cfg, y, y, 10)
    assert k == 5 and torch.equal(tr, y % 5)
    tr, te, k = transform_labels(Config(fine=True), y, y, 10)
    assert k == 20 and torch.equal(tr % 10, y) and not torch.equal(tr, te)  # own draws per split
    tr, te, k = transform_labels(Config(random_coarse=2, seed=3), y, y, 10)
    assert k == 2 and torch.equal(tr, te)  # one class shuffle for both splits
    # classes of one super-class share it everywhere
    assert all(len(set(tr[y == c].tolist())) == 1 for c in range(10))
    with pytest.raises(ValueError, match="--coarse"):
        transform_labels(Config(coarse=11), y, y, 10)
    with pytest.raises(ValueError, match="^--coarse, --fine and --random-coarse: choose at most one$"):
        Config(coarse=2, fine=True)


def test_command_line(tmp_path, capsys):
    cfg = parse_args(["--arch", "mlp", "--coarse", "5", "--layers", "layer1, layer2", "--epochs", "3"])
    assert cfg.coarse == 5 and cfg.layers == ["layer1", "layer2"] and cfg.epochs == 3
    with pytest.raises(SystemExit):
        parse_args(["--coarse", "5", "--fine"])
    assert main(["--dataset", "mnist", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mnist" in err and "train-images-idx3-ubyte" in err
    assert main(["--dataset", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "cifar-10" in err and "--download" in err


# ------------------------------------------------------------------------ the Config and its flags

# every flag of python -m ncfast.train, in --help's order
FLAGS = [
    "--arch",
    "--depth",
    "--width",
    "--dataset",
    "--data",
    "--download",
    "--coarse",
    "--fine",
    "--random-coarse",
    "--epochs",
    "--batch-size",
    "--train-subset",
    "--no-augment",
    "--lr",
    "--momentum",
    "--weight-decay",
    "--schedule",
    "--metrics-every",
    "--distance-epochs",
    "--layers",
    "--logit-scale",
    "--loss",
    "--init",
    "--init-scale",
    "--output-norm",
    "--svsl-alpha",
    "--svsl-from",
    "--clp-embed",
    "--it-threshold",
    "--max-dim",
    "--seed",
    "--device",
    "--out",
    "--resume",
    "--no-progress",
]


def _help_entries(capsys, monkeypatch) -> dict[str, str]:
    """--help as {flag: its entry with the whitespace collapsed}, in order; exit status 0."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("\noptions:\n") + len("\noptions:\n") :]
    entries = {}
    for block in re.split(r"\n(?=  -)", options):
        words = " ".join(block.split())
        entries[words.split()[0].rstrip(",")] = words
    return entries


def test_every_config_field_is_a_flag_listed_in_help_with_its_default(capsys, monkeypatch):
    """Every Config field is a flag (its name with - for _, --no-augment / --no-progress for the two
    fields True by default) in --help, whose entry ends with the dataclass default where that is a
    value; a field None or False by default is a flag given or not."""
    entries = _help_entries(capsys, monkeypatch)
    assert list(entries) == ["-h"] + FLAGS
    fields = {flag_of(f): f for f in dataclasses.fields(Config)}
    assert list(fields) == FLAGS
    assert fields["--no-augment"].name == "augment" and fields["--no-progress"].name == "progress"
    shown = {flag: f.default for flag, f in fields.items() if f.default is not None and not isinstance(f.default, bool)}
    assert shown == {
        "--arch": "resnet18",
        "--dataset": "digits",
        "--epochs": 60,
        "--batch-size": 128,
        "--lr": 0.01,
        "--momentum": 0.9,
        "--weight-decay": 5e-4,
        "--schedule": "cosine",
        "--metrics-every": 5,
        "--logit-scale": 1.0,
        "--loss": "ce",
        "--init": "default",
        "--init-scale": 1.0,
        "--svsl-alpha": 0.0,
        "--clp-embed": "tsne",
        "--it-threshold": 0.995,
        "--max-dim": 1024,
        "--seed": 0,
        "--device": "auto",
        "--out": "runs/latest",
    }
    for flag, default in shown.items():
        assert entries[flag].endswith(f"(default: {default})"), entries[flag]
    assert entries["--weight-decay"].endswith("(default: 0.0005)") and entries["--lr"].endswith("(default: 0.01)")
    for flag in set(FLAGS) - set(shown):
        assert "(default: " not in entries[flag].replace("(default: the model's", ""), entries[flag]
    # choices, and the values' names
    assert entries["--arch"].startswith(
        "--arch {resnet18,densenet121,vgg11,mlp,resnet34,densenet169,densenet201,vgg13,vgg16,vgg19} "
    )
    assert entries["--dataset"].startswith("--dataset {digits,mnist,fashion-mnist,cifar10,cifar100,gmm} ")
    assert entries["--loss"].startswith("--loss {ce,mse} ")
    assert entries["--schedule"].startswith("--schedule {cosine,step} ")
    assert entries["--init"].startswith("--init {default,kaiming} ")
    assert entries["--output-norm"].startswith("--output-norm {layernorm} ")
    assert entries["--clp-embed"].startswith("--clp-embed {tsne,pca,none} ")
    for flag, value in (
        ("--coarse", "K"),
        ("--random-coarse", "K"),
        ("--train-subset", "N"),
        ("--logit-scale", "T"),
        ("--distance-epochs", "E1,E2,..."),
        ("--svsl-from", "LAYER"),
        ("--batch-size", "BATCH_SIZE"),
    ):
        assert entries[flag].startswith(f"{flag} {value} "), entries[flag]
    for flag in ("--download", "--fine", "--no-augment", "--resume", "--no-progress"):  # no value to give
        assert entries[flag] == f"{flag} {fields[flag].metadata['help']}"
    assert entries["--no-augment"] == (
        "--no-augment train on the images as they are: no random crops or flips (Papyan et al.'s protocol)"
    )
    assert parse_args([]) == Config()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"lr": 0}, "--lr must be a finite number > 0, got 0"),
        ({"lr": float("nan")}, "--lr must be a finite number > 0, got nan"),
        ({"epochs": 0}, "--epochs must be >= 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
        ({"metrics_every": -2}, "--metrics-every must be >= 1, got -2"),
        ({"max_dim": 0}, "--max-dim must be >= 1, got 0"),
        ({"train_subset": 0}, "--train-subset must be >= 1, got 0"),
        ({"coarse": 5, "fine": True}, "--coarse, --fine and --random-coarse: choose at most one"),
        ({"coarse": "official", "random_coarse": 3}, "--coarse, --fine and --random-coarse: choose at most one"),
        ({"fine": True, "random_coarse": 3}, "--coarse, --fine and --random-coarse: choose at most one"),
        ({"coarse": 1}, "--coarse must be a number of super-classes >= 2, or 'official', got 1"),
        ({"coarse": "five"}, "--coarse: a number of super-classes K or 'official', got 'five'"),
        ({"random_coarse": 0}, "--random-coarse must be a number of super-classes >= 2, got 0"),
        ({"momentum": 1.0}, "--momentum must be a finite number in [0, 1), got 1.0"),
        ({"weight_decay": -1e-4}, "--weight-decay must be a finite number >= 0, got -0.0001"),
        ({"it_threshold": 0.0}, "--it-threshold must be a train accuracy in (0, 1], got 0.0"),
        ({"init_scale": 0.0}, "--init-scale must be a finite number > 0, got 0.0"),
        ({"logit_scale": float("inf")}, "--logit-scale must be a finite number > 0, got inf"),
        ({"svsl_alpha": -1.0}, "--svsl-alpha must be a finite number >= 0, got -1.0"),
        ({"svsl_from": " "}, "--svsl-from: expected a probed layer's name, got ' '"),
        ({"seed": -1}, "--seed must be in [0, 4294967295] (2^32 - 1), got -1"),
        ({"seed": 2**32}, "--seed must be in [0, 4294967295] (2^32 - 1), got 4294967296"),
        ({"width": 0}, "--width must be between 1 and 16,777,216, got 0"),
        ({"arch": "mlp", "depth": 0}, "--depth 0: the MLP needs at least 1 hidden layer, got 0"),
        ({"arch": "vgg11", "depth": 12}, "--depth 12: vgg comes in depths (11, 13, 16, 19), got 12"),
        ({"layers": []}, "--layers: expected comma-separated module names, got []"),
        ({"layers": ["layer1", ""]}, "--layers: expected comma-separated module names, got ['layer1', '']"),
        ({"distance_epochs": [0, 61]}, "--distance-epochs: must lie in [0, --epochs = 60], got [0, 61]"),
        ({"epochs": 3, "distance_epochs": (-1, 2)}, "--distance-epochs: must lie in [0, --epochs = 3], got (-1, 2)"),
        # the choices --help lists, and the fields' types
        (
            {"arch": "resnet50"},
            (
                "--arch: expected one of resnet18, densenet121, vgg11, mlp, resnet34, densenet169, "
                "densenet201, vgg13, vgg16, vgg19, got 'resnet50'"
            ),
        ),
        (
            {"dataset": "imagenet"},
            ("--dataset: expected one of digits, mnist, fashion-mnist, cifar10, cifar100, gmm, got 'imagenet'"),
        ),
        ({"loss": "l1"}, "--loss: expected one of ce, mse, got 'l1'"),
        ({"schedule": "linear"}, "--schedule: expected one of cosine, step, got 'linear'"),
        ({"init": "xavier"}, "--init: expected one of default, kaiming, got 'xavier'"),
        ({"output_norm": "batchnorm"}, "--output-norm: expected one of layernorm, got 'batchnorm'"),
        ({"clp_embed": "umap"}, "--clp-embed: expected one of tsne, pca, none, got 'umap'"),
        ({"epochs": "3"}, "--epochs: expected an integer, got '3'"),
        ({"epochs": 3.0}, "--epochs: expected an integer, got 3.0"),
        ({"lr": "0.1"}, "--lr: expected a number, got '0.1'"),
        ({"width": True}, "--width: expected an integer or None, got True"),
        ({"fine": 1}, "--fine: expected True or False, got 1"),
        ({"augment": "no"}, "--no-augment: expected True or False, got 'no'"),
        ({"progress": None}, "--no-progress: expected True or False, got None"),
        ({"coarse": 2.5}, "--coarse: expected an integer, a string or None, got 2.5"),
        ({"layers": "layer1"}, "--layers: expected a list of strings or None, got 'layer1'"),
        ({"distance_epochs": [1.5]}, "--distance-epochs: expected a list of integers or None, got [1.5]"),
        ({"out": None}, "--out: expected a string, got None"),
    ],
)
def test_config_refuses_a_bad_value_naming_the_flag(fields, message):
    with pytest.raises(ValueError) as e:
        Config(**fields)
    assert str(e.value) == message


def test_config_is_checked_on_replace_and_takes_what_drivers_and_checkpoints_pass(tmp_path):
    """dataclasses.replace checks the new Config; Configs of the shapes the drivers and a checkpoint's
    saved config (asdict) pass are taken as they are: an int for a float, a tuple for a list, numpy
    integers."""
    cfg = Config(arch="mlp", epochs=3, distance_epochs=[0, 3])
    with pytest.raises(ValueError, match=r"^--distance-epochs: must lie in \[0, --epochs = 2\], got \[0, 3\]$"):
        dataclasses.replace(cfg, epochs=2)
    assert dataclasses.replace(cfg, lr=0.1) == Config(arch="mlp", epochs=3, distance_epochs=[0, 3], lr=0.1)
    valid = [
        Config(
            out=str(tmp_path),
            dataset="cifar100",
            coarse="official",
            width=None,
            epochs=350,
            metrics_every=10,
            distance_epochs=(20, 120, 240, 350),
        ),
        Config(
            dataset="fashion-mnist",
            arch="resnet18",
            width=8,
            train_subset=5000,
            augment=False,
            coarse=5,
            clp_embed="pca",
            layers=None,
            distance_epochs=[1, 5, 10, 20],
            epochs=20,
        ),
        Config(
            arch="vgg19",
            depth=19,
            logit_scale=1000,
            init="kaiming",
            init_scale=0.5,
            output_norm="layernorm",
            loss="mse",
            max_dim=2048,
            clp_embed="none",
            svsl_alpha=0,
            seed=np.int64(3),
        ),
        Config(
            arch="resnet34",
            layers=["layer1", "layer3", "pool"],
            svsl_alpha=4e-6,
            svsl_from="pool",
            fine=True,
            schedule="step",
            it_threshold=1,
        ),
        Config(
            arch="mlp", depth=10_000, width=1 << 24, random_coarse=3, seed=2**32 - 1, lr=1, momentum=0, weight_decay=0
        ),
    ]
    for cfg in valid:
        assert Config(**dataclasses.asdict(cfg)) == cfg
    assert valid[2].logit_scale == 1000 and valid[2].seed == 3 and valid[0].distance_epochs == (20, 120, 240, 350)


COMMAND_LINES = [
    ([], Config()),
    (
        ["--arch", "mlp", "--coarse", "5", "--layers", "layer1, layer2", "--epochs", "3"],
        Config(arch="mlp", coarse=5, layers=["layer1", "layer2"], epochs=3),
    ),
    (
        [
            "--arch",
            "resnet18",
            "--depth",
            "34",
            "--width",
            "16",
            "--dataset",
            "cifar100",
            "--data",
            "/data/cifar",
            "--download",
            "--coarse",
            "official",
            "--epochs",
            "60",
            "--batch-size",
            "256",
            "--train-subset",
            "2000",
            "--no-augment",
            "--lr",
            "0.1",
            "--momentum",
            "0",
            "--weight-decay",
            "5e-3",
            "--schedule",
            "step",
            "--metrics-every",
            "10",
            "--distance-epochs",
            "0,10,60",
            "--seed",
            "7",
            "--device",
            "cpu",
            "--out",
            "runs/x",
            "--resume",
            "--no-progress",
        ],
        Config(
            arch="resnet18",
            depth=34,
            width=16,
            dataset="cifar100",
            data="/data/cifar",
            download=True,
            coarse="official",
            epochs=60,
            batch_size=256,
            train_subset=2000,
            augment=False,
            lr=0.1,
            momentum=0.0,
            weight_decay=0.005,
            schedule="step",
            metrics_every=10,
            distance_epochs=[0, 10, 60],
            seed=7,
            device="cpu",
            out="runs/x",
            resume=True,
            progress=False,
        ),
    ),
    (
        [
            "--dataset",
            "gmm",
            "--arch",
            "mlp",
            "--fine",
            "--logit-scale",
            "100",
            "--loss",
            "mse",
            "--init",
            "kaiming",
            "--init-scale",
            "0.5",
            "--output-norm",
            "layernorm",
            "--svsl-alpha",
            "1e-5",
            "--svsl-from",
            "layer2",
            "--clp-embed",
            "pca",
            "--it-threshold",
            "0.9",
            "--max-dim",
            "64",
        ],
        Config(
            dataset="gmm",
            arch="mlp",
            fine=True,
            logit_scale=100.0,
            loss="mse",
            init="kaiming",
            init_scale=0.5,
            output_norm="layernorm",
            svsl_alpha=1e-5,
            svsl_from="layer2",
            clp_embed="pca",
            it_threshold=0.9,
            max_dim=64,
        ),
    ),
    (["--random-coarse", "3", "--seed", "4294967295"], Config(random_coarse=3, seed=2**32 - 1)),
]


@pytest.mark.parametrize("argv, want", COMMAND_LINES)
def test_command_lines_give_the_configs_built_by_hand(argv, want):
    got = parse_args(argv)
    assert got == want and type(got.lr) is float and type(got.epochs) is int


def test_the_command_lines_cover_every_flag():
    assert {a for argv, _ in COMMAND_LINES for a in argv if a.startswith("--")} == set(FLAGS)


def test_command_line_paper_knobs(tmp_path, capsys):
    cfg = parse_args(["--arch", "mlp", "--logit-scale", "100", "--svsl-alpha", "1e-5", "--svsl-from", "layer2"])
    assert cfg.logit_scale == 100.0 and cfg.svsl_alpha == 1e-5 and cfg.svsl_from == "layer2"
    cfg = parse_args([])
    assert cfg.logit_scale == 1.0 and cfg.svsl_alpha == 0.0 and cfg.svsl_from is None
    for bad in (
        ["--logit-scale", "0"],
        ["--logit-scale", "-1"],
        ["--logit-scale", "nan"],
        ["--svsl-alpha", "-1e-5"],
        ["--temperature", "2"],
        ["--svsl-gamma", "1"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert bad[0] in capsys.readouterr().err
    out = str(tmp_path / "x")
    assert (
        main(
            [
                "--dataset",
                "gmm",
                "--arch",
                "mlp",
                "--svsl-alpha",
                "1e-5",
                "--svsl-from",
                "layer7",
                "--out",
                out,
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--svsl-from" in err and "layer7" in err and "layer1" in err


@pytest.mark.slow
def test_paper_knobs_run_and_change_training(tmp_path):
    """--svsl-alpha / --svsl-from, --logit-scale, --init-scale and --output-norm reach the run: the
    LayerNorm becomes the penultimate layer, and SVSL changes the first epoch's loss."""
    base = dict(
        dataset="digits",
        arch="mlp",
        coarse=5,
        epochs=1,
        batch_size=256,
        metrics_every=1,
        clp_embed="none",
        progress=False,
    )
    plain = Trainer(Config(out=str(tmp_path / "plain"), **base))
    assert plain.logit_scale == 1.0 and plain.svsl_layers == []
    plain.run()
    knobs = Trainer(
        Config(
            out=str(tmp_path / "knobs"),
            svsl_alpha=0.5,
            svsl_from="layer2",
            logit_scale=2.0,
            init_scale=0.5,
            output_norm="layernorm",
            **base,
        )
    )
    assert knobs.model.penultimate_name == "norm" and knobs.layers == ["layer1", "layer2", "norm"]
    assert knobs.svsl_layers == ["layer2", "norm"] and knobs.logit_scale == 2.0
    summary = knobs.run()
    first = lambda run: json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[1])
    assert first("knobs")["train_loss"] != first("plain")["train_loss"]
    assert "norm" in summary["final_metrics"] and "nc3" in summary["final_metrics"]["norm"]["train"]
    assert summary["config"]["logit_scale"] == 2.0 and summary["config"]["svsl_from"] == "layer2"


@pytest.mark.slow
def test_no_augment_and_the_per_epoch_history(tmp_path, monkeypatch):
    """--no-augment trains on the images as they are (augment_batch is never called; it is without
    the flag), and history.jsonl holds every epoch, measured or not, with metrics.jsonl's accuracies
    at the measured ones."""
    from ncfast.train import trainer as trainer_mod

    assert parse_args(["--no-augment"]).augment is False and parse_args([]).augment is True
    calls = []
    real = trainer_mod.augment_batch
    monkeypatch.setattr(trainer_mod, "augment_batch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    base = dict(
        dataset="digits", arch="mlp", epochs=3, batch_size=512, metrics_every=2, clp_embed="none", progress=False
    )
    Trainer(Config(out=str(tmp_path / "plain"), augment=False, **base)).run()
    assert calls == []
    augmented = Trainer(Config(out=str(tmp_path / "augmented"), **base))
    augmented.run()
    assert len(calls) == 3 * math.ceil(augmented.x["train"].shape[0] / 512)  # every batch of 3 epochs
    rows = [json.loads(line) for line in (tmp_path / "plain" / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["seconds"] is None and all(r["seconds"] > 0 for r in rows[1:])
    measured = {r["epoch"]: r for r in map(json.loads, (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(measured) == [0, 2, 3]
    # what measuring cost: the seconds of both splits' measure on a measured epoch, null otherwise
    assert [r["epoch"] for r in rows if r["measure_seconds"] is not None] == [0, 2, 3]
    assert all(r["measure_seconds"] > 0 for r in rows if r["epoch"] in measured)
    for r in rows:
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        if r["epoch"] in measured:
            assert (r["train_acc"], r["test_acc"]) == (
                measured[r["epoch"]]["train_acc"],
                measured[r["epoch"]]["test_acc"],
            )


def test_train_subset_draws_rows_with_the_seed(tmp_path):
    """--train-subset N keeps N training rows drawn with the seed (features, training and original
    labels together); the test split stays whole; N outside [1, n] is an error naming the flag."""
    from ncfast.train.data import load_dataset

    assert parse_args(["--train-subset", "200"]).train_subset == 200 and parse_args([]).train_subset is None
    ds = load_dataset("digits", None, seed=3)
    base = dict(dataset="digits", arch="mlp", coarse=5, epochs=1, progress=False, seed=3)
    a = Trainer(Config(out=str(tmp_path / "a"), train_subset=200, **base))
    b = Trainer(Config(out=str(tmp_path / "b"), train_subset=200, **base))
    assert a.x["train"].shape[0] == 200 and a.x["test"].shape[0] == ds.test_x.shape[0]
    assert torch.equal(a.x["train"], b.x["train"]) and torch.equal(a.y_orig["train"], b.y_orig["train"])
    flat = ds.train_x.flatten(1)
    for row, label in zip(a.x["train"].flatten(1), a.y_orig["train"]):  # a training row, with its own label
        match = (flat == row).all(dim=1)
        assert bool(match.any()) and int(label) in ds.train_y[match].tolist()
    assert torch.equal(a.y["train"], a.y_orig["train"] % 5)
    other = Trainer(Config(out=str(tmp_path / "c"), train_subset=200, **{**base, "seed": 4}))
    assert not torch.equal(other.x["train"], a.x["train"])
    for bad in (0, ds.train_x.shape[0] + 1):
        with pytest.raises(ValueError, match="--train-subset"):
            Trainer(Config(out=str(tmp_path / "d"), train_subset=bad, **base))


def test_svsl_layers_follow_the_model_from_svsl_from(tmp_path):
    """SVSL covers the probed layers from --svsl-from on in model order (not --layers order), the first
    probed layer by default; the head is the output layer, which train_epoch always adds."""
    base = dict(dataset="gmm", arch="mlp", epochs=1, progress=False, out=str(tmp_path / "run"))
    t = Trainer(Config(svsl_alpha=1e-5, layers=["layer2", "head", "layer1"], **base))
    assert t.svsl_layers == ["layer1", "layer2"]
    assert Trainer(Config(svsl_alpha=1e-5, svsl_from="layer2", **base)).svsl_layers == ["layer2"]
    assert Trainer(Config(svsl_alpha=1e-5, svsl_from="head", layers=["layer1", "head"], **base)).svsl_layers == []
    assert Trainer(Config(svsl_alpha=0.0, svsl_from="layer2", **base)).svsl_layers == []  # off
    for bad in ("layer9", "flatten"):  # unknown, or a module that is not probed
        with pytest.raises(ValueError, match="--svsl-from"):
            Trainer(Config(svsl_alpha=1e-5, svsl_from=bad, **base))
    with pytest.raises(ValueError, match="--svsl-alpha"):
        Trainer(Config(svsl_alpha=-1.0, **base))
    for bad in (0.0, -2.0, float("inf")):
        with pytest.raises(ValueError, match="--logit-scale"):
            Trainer(Config(logit_scale=bad, **base))


def test_training_loss_is_ce_of_scaled_logits_plus_svsl(tmp_path):
    """One full batch: the loss train_epoch reports (taken before the step) is paper 002's CE on
    T * z plus paper 003's SVSL over the layers from --svsl-from to the output layer, the scaled
    logits, with C = the number of training classes."""
    from ncfast.losses import svsl_loss

    t = Trainer(
        Config(
            dataset="gmm",
            arch="mlp",
            coarse=4,
            epochs=1,
            batch_size=100_000,
            progress=False,
            out=str(tmp_path / "run"),
            svsl_alpha=20.0,
            svsl_from="layer2",
            logit_scale=3.0,
        )
    )
    x, y = t.x["train"], t.y["train"]
    assert t.num_train_classes == 4 and not t.ds.augment
    with torch.no_grad():
        h2 = t.model.layer2(t.model.layer1(t.model.flatten(x)))
        z = t.model.head(h2)
        ce = torch.nn.functional.cross_entropy(3.0 * z, y)
        want = ce + svsl_loss([h2, 3.0 * z], y, alpha=20.0, num_classes=4)
        without_output = ce + svsl_loss([h2], y, alpha=20.0, num_classes=4)
        unscaled = torch.nn.functional.cross_entropy(z, y) + svsl_loss([h2, z], y, alpha=20.0, num_classes=4)
    got = t.train_epoch()
    assert got == pytest.approx(want.item(), rel=1e-5)
    for other in (without_output, unscaled):
        assert got != pytest.approx(other.item(), rel=1e-3)


def test_linear_probe_matches_scikit_learn():
    """The torch L-BFGS probe fits scikit-learn's default LogisticRegression objective: on the digits
    pixels both score within 2 points; on separated blobs both are perfect."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from ncfast.train.probes import linear_probe

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data, d.target, test_size=0.3, random_state=0, stratify=d.target)
    ours = linear_probe(xtr, ytr, xte, yte)
    sc = StandardScaler().fit(xtr)
    theirs = LogisticRegression(max_iter=5000).fit(sc.transform(xtr), ytr).score(sc.transform(xte), yte)
    assert abs(ours - theirs) < 0.02 and ours > 0.93
    g = np.random.default_rng(0)
    centres = g.normal(size=(3, 5)) * 10
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + g.normal(size=(120, 5))
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2]) == 1.0


@pytest.mark.parametrize("embedding", ["tsne", "pca"])
def test_clp_on_features_without_spread(embedding):
    """A super-class whose units all died gives identical rows: t-SNE used to take the process down
    (segmentation fault) after dividing by their zero spread. They embed at the origin, and CLP
    scores what its classifier can: with every feature equal it predicts one pseudo-label for every
    row, right for half of one super-class's rows (1/4 of the test rows) and none of the other's."""
    from ncfast.train.probes import clp, embed

    x = np.zeros((120, 16), dtype=np.float32)
    y_orig = np.arange(120) % 4
    y_sup = y_orig % 2
    assert (embed(x, embedding) == 0).all() and embed(x, embedding).shape == (120, 2)
    acc, pictures = clp(x, y_sup, y_orig, x[:40], y_sup[:40], y_orig[:40], embedding=embedding)
    assert acc == 0.25 and set(pictures) == {0, 1}


def test_mse_loss_is_squared_distance_of_softmax_to_one_hot():
    """--loss mse: mean_i ||softmax(T z_i) - e_{y_i}||^2 (paper 002's softmax + MSE), by hand."""
    from ncfast.train.trainer import task_loss

    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    p = np.exp(z.numpy()) / np.exp(z.numpy()).sum(1, keepdims=True)
    want = ((p[0] - [1, 0, 0]) ** 2).sum() / 2 + ((p[1] - [0, 1, 0]) ** 2).sum() / 2
    assert float(task_loss(z, y, "mse")) == pytest.approx(want, rel=1e-12)
    assert float(task_loss(z, y, "ce")) == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)), rel=1e-12)
    with pytest.raises(ValueError, match="loss"):
        task_loss(z, y, "hinge")


@pytest.mark.slow
def test_depth_width_init_loss_flags_reach_the_run(tmp_path):
    cfg = parse_args(
        [
            "--arch",
            "mlp",
            "--depth",
            "3",
            "--width",
            "32",
            "--init",
            "kaiming",
            "--loss",
            "mse",
            "--distance-epochs",
            "0,2",
            "--coarse",
            "official",
            "--dataset",
            "cifar100",
        ]
    )
    assert (cfg.depth, cfg.width, cfg.init, cfg.loss, cfg.distance_epochs, cfg.coarse) == (
        3,
        32,
        "kaiming",
        "mse",
        [0, 2],
        "official",
    )
    assert parse_args([]).width is None and parse_args(["--coarse", "5"]).coarse == 5
    for argv in (["--coarse", "five"], ["--distance-epochs", "a,b"], ["--width", "0"], ["--loss", "l1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    base = dict(
        dataset="digits", arch="mlp", depth=3, width=16, epochs=1, batch_size=512, clp_embed="none", progress=False
    )
    t = Trainer(Config(out=str(tmp_path / "run"), loss="mse", init="kaiming", **base))
    assert t.layers == ["layer1", "layer2", "layer3"] and t.model.head.in_features == 16
    summary = t.run()
    assert summary["config"]["loss"] == "mse" and 0 <= summary["train_accuracy"] <= 1
    # the MSE of a 10-way softmax is below 2 (its maximum), the CE of the same net is not bounded so
    assert 0 < t.history[1]["train_loss"] < 2
    for bad, match in (
        ({"loss": "l1"}, "--loss"),
        ({"depth": 0}, "depth"),
        ({"distance_epochs": [5]}, "--distance-epochs"),
    ):
        with pytest.raises(ValueError, match=match):
            Trainer(Config(out=str(tmp_path / "bad"), **{**base, **bad}))


@pytest.mark.slow
def test_distance_epochs_and_the_interpolation_epoch_are_measured(tmp_path):
    """--distance-epochs are measured whatever --metrics-every says and are exactly the class-distance
    files; the interpolation epoch (first train accuracy >= it_threshold) is measured too."""
    t = Trainer(
        Config(
            dataset="digits",
            arch="mlp",
            width=64,
            epochs=6,
            batch_size=64,
            lr=0.1,
            augment=False,
            metrics_every=100,
            distance_epochs=[2],
            it_threshold=0.9,
            clp_embed="none",
            progress=False,
            out=str(tmp_path / "run"),
        )
    )
    t.run()
    it = next(r["epoch"] for r in t.history if r["epoch"] > 0 and r["train_acc"] >= 0.9)
    measured = [r["epoch"] for r in t.history if "layers" in r]
    assert it not in (0, 2, 6)  # the run is set up so that only the rule measures it
    assert measured == sorted({0, 2, it, 6})
    files = sorted(p.name for p in (tmp_path / "run" / "class_distance").glob("epoch_[0-9][0-9][0-9].npy"))
    assert files == [f"epoch_{e:03d}.npy" for e in measured]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interpolation_epoch"] == it


def test_official_coarse_labels_use_the_data_sets_superclasses():
    """--coarse official maps each class to the data set's coarse_of (CIFAR-100's 20 super-classes);
    a data set without them is an error naming the flag."""
    coarse_of = torch.tensor([2, 0, 1, 2, 0, -1])
    y_tr, y_te = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([4, 3, 0])
    a, b, k = transform_labels(Config(coarse="official", dataset="cifar100"), y_tr, y_te, 6, coarse_of=coarse_of)
    assert a.tolist() == [2, 0, 1, 2, 0] and b.tolist() == [0, 2, 2] and k == 3
    with pytest.raises(ValueError, match="--coarse official"):
        transform_labels(Config(coarse="official", dataset="digits"), y_tr, y_te, 6)


@pytest.mark.slow
def test_on_measured_hook_adds_to_the_measured_records(tmp_path):
    """A subclass's on_measured sees every measured epoch (and only those) with the model in that
    epoch's state; what it adds to the record lands in metrics.jsonl."""

    class Norms(Trainer):
        def on_measured(self, record):
            w = self.model.head.weight.detach().double()
            record["head_norm"] = float(w.norm())

    t = Norms(
        Config(
            dataset="digits",
            arch="mlp",
            width=32,
            epochs=4,
            batch_size=128,
            lr=0.05,
            augment=False,
            metrics_every=2,
            clp_embed="none",
            progress=False,
            out=str(tmp_path / "run"),
        )
    )
    t.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 2, 4]
    assert all("head_norm" not in r for r in t.history if "layers" not in r)
    # the last record's norm is the final model's
    assert rows[-1]["head_norm"] == pytest.approx(float(t.model.head.weight.detach().double().norm()), rel=1e-12)
    assert rows[0]["head_norm"] != rows[-1]["head_norm"]


# ------------------------------------------------------------------------------- bad input, one line


def _cli(argv, capsys):
    """(exit status, stderr) of ``main(argv)`` in this process: a parse error is argparse's SystemExit;
    any other exception escapes and fails the test, as a traceback would."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _assert_one_line(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    last = lines[-1]
    # argparse: usage, then "prog: error: ..."; a run: one line "error: ..." (after progress lines, if any)
    assert last.startswith(("python -m ncfast.train: error: ", "error: ")), err
    assert sum("error" in line for line in lines) == 1, err
    for needle in needles:
        assert needle in last, (needle, err)


@pytest.mark.parametrize(
    "extra, needle",
    [
        # checked by Config, which parse_args builds: argparse's one line, exit 2
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--momentum", "5"], "--momentum"),
        (["--momentum", "-0.1"], "--momentum"),
        (["--momentum", "nan"], "--momentum"),
        (["--momentum", "1"], "--momentum"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--init-scale", "nan"], "--init-scale"),
        (["--init-scale", "0"], "--init-scale"),
        (["--it-threshold", "7"], "--it-threshold"),
        (["--it-threshold", "0"], "--it-threshold"),
        (["--it-threshold", "nan"], "--it-threshold"),
        (["--seed", "-5"], "--seed"),
        (["--seed", str(10**23)], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--depth", "10001"], "--depth 10001: the MLP takes at most 10,000 hidden layers"),
        (["--depth", str(10**8)], "--depth"),
        (["--depth", "0"], "--depth"),
        (["--arch", "resnet18", "--depth", "7"], "--depth 7: resnet comes in depths (18, 34)"),
        (["--width", str(10**23)], "--width"),
        (["--width", "0"], "--width"),
        (["--layers", ""], "--layers"),
        (["--layers", " , "], "--layers"),
        (["--distance-epochs", "a,b"], "--distance-epochs"),
        (["--distance-epochs", ""], "--distance-epochs"),
        (["--coarse", "0"], "--coarse"),
        (["--coarse", "-3"], "--coarse"),
        (["--coarse", "1"], "--coarse"),
        (["--random-coarse", "0"], "--random-coarse"),
        (["--random-coarse", "1"], "--random-coarse"),
        (["--train-subset", "-1"], "--train-subset"),
        (["--train-subset", "0"], "--train-subset"),
        (["--distance-epochs", "5"], "--distance-epochs: must lie in [0, --epochs = 1], got [5]"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--metrics-every", "0"], "--metrics-every"),
        (["--max-dim", "0"], "--max-dim must be >= 1, got 0"),
        # checked when the run starts: "error: ..." on one line, exit 2
        (["--train-subset", "1"], "--train-subset 1: the samples drawn hold one training class"),
        (["--svsl-from", "nosuch"], "--svsl-from"),
        (["--coarse", "11"], "--coarse"),
        (["--random-coarse", "11"], "--random-coarse"),
        (["--coarse", "official"], "--coarse official"),
        (["--device", "nosuch"], "--device nosuch: not a device"),
        (["--device", "meta"], "--device meta"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--dataset", "gmm", "--arch", "resnet18"], "--arch resnet18"),
        (["--out", "{file}/run"], "--out {file}/run: could not create the output folder"),
        (["--dataset", "fashion-mnist", "--data", "{tmp}/nonexistent"], "{tmp}/nonexistent"),
        (["--dataset", "mnist", "--data", "{file}"], "{file}"),
        (["--dataset", "cifar10", "--data", "{file}"], "{file}"),
    ],
)
def test_bad_flags_are_one_line_errors_naming_the_flag(tmp_path, capsys, extra, needle):
    """Every bad value is refused before training, on one line that names the flag (or the file),
    with exit status 2 and no traceback. Before these checks --lr nan / --weight-decay nan trained
    to a NaN network, --momentum 5, --it-threshold 7, --layers '' and --distance-epochs '' were
    accepted, --seed -5 / 10^23 failed with scikit-learn's / torch's words ('random_state',
    "Overflow when unpacking long long"), --depth 10^8 built layers until memory ran out (10^23: an
    OverflowError traceback), --width 10^23 a traceback, --coarse 1 said "num_classes: must be >= 2",
    --train-subset 1 failed in the measurement, --device cuda:99 (no CUDA) and --out inside a file
    were tracebacks, --device nosuch / meta named no flag."""
    (tmp_path / "file").write_text("not a folder")
    fill = lambda s: s.replace("{file}", str(tmp_path / "file")).replace("{tmp}", str(tmp_path))
    argv = ["--arch", "mlp", "--epochs", "1", "--clp-embed", "none", "--no-progress", "--out", str(tmp_path / "run")]
    code, err = _cli(argv + [fill(a) for a in extra], capsys)
    _assert_one_line(code, err, fill(needle))


def test_config_values_are_checked_by_the_trainer_too(tmp_path, monkeypatch):
    """train(Config) is an API of its own: the values the command line refuses are refused by Config,
    and by Trainer where a field was assigned after the Config was made (--device, which needs the
    machine, by Trainer only), naming the flag, before any data is loaded."""
    from ncfast.train import trainer as trainer_mod

    def trap(*args, **kwargs):
        raise AssertionError("load_dataset called before the checks")

    monkeypatch.setattr(trainer_mod, "load_dataset", trap)
    base = {"dataset": "digits", "arch": "mlp", "epochs": 1, "progress": False, "out": str(tmp_path / "run")}
    for bad, match in (
        ({"lr": float("nan")}, "--lr"),
        ({"lr": 0.0}, "--lr"),
        ({"momentum": 5.0}, "--momentum"),
        ({"weight_decay": float("nan")}, "--weight-decay"),
        ({"it_threshold": 7.0}, "--it-threshold"),
        ({"init_scale": float("nan")}, "--init-scale"),
        ({"seed": -5}, "--seed"),
        ({"seed": 10**23}, "--seed"),
        ({"depth": 10**8}, "--depth"),
        ({"device": "nosuch"}, "--device"),
        ({"coarse": 1}, "--coarse"),
        ({"fine": True, "random_coarse": 3}, "--coarse, --fine"),
        ({"distance_epochs": [2]}, "--distance-epochs"),
        ({"loss": "l1"}, "--loss"),
    ):
        with pytest.raises(ValueError, match=f"^{match}"):
            Trainer(Config(**{**base, **bad}))
        cfg = Config(**base)
        for name, value in bad.items():
            setattr(cfg, name, value)
        with pytest.raises(ValueError, match=f"^{match}"):
            Trainer(cfg)


@pytest.mark.slow
def test_layers_without_the_penultimate_layer_run_to_the_end(tmp_path, capsys):
    """--layers that leave out the penultimate features: the run finishes (it ended in a KeyError
    traceback in summary.json's initial logits norm) and nc_curves.png shows the deepest probed
    layer."""
    out = tmp_path / "run"
    code, err = _cli(
        [
            "--arch",
            "mlp",
            "--width",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "512",
            "--layers",
            "layer1",
            "--clp-embed",
            "none",
            "--no-progress",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final_metrics"]) == {"layer1"} and summary["initial_logits_norm"] is None
    assert (out / "figures" / "nc_curves.png").stat().st_size > 0


# --------------------------------------------------------------------------------- memory, beforehand


def test_a_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path, monkeypatch, capsys):
    """--width 3000000 (and an MLP 10,000 layers deep) are refused before the model is built, naming
    the flag, its parameter count and the memory free: the model is sized on the meta device. Before,
    the allocator failed ("DefaultCPUAllocator: can't allocate memory: you tried to allocate
    36000000000000 bytes", naming no flag), and --depth 100000000 built layers until memory ran out.
    build_model is replaced by a trap: the refusal must come before it."""
    from ncfast.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "available_bytes", lambda device: 1 << 30)

    def trap(*args, **kwargs):
        raise AssertionError("build_model called before the memory check")

    monkeypatch.setattr(trainer_mod, "build_model", trap)
    base = ["--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    for extra, flag in (
        (["--arch", "mlp", "--width", "3000000"], "--width 3000000: mlp has 9e+12 parameters"),
        (["--arch", "resnet18", "--width", "3000000"], "--width 3000000: resnet18 has"),
        (["--arch", "mlp", "--depth", "10000"], "--depth 10000: mlp has 2.6e+09 parameters"),
    ):
        t0 = time.perf_counter()
        code, err = _cli(base + extra, capsys)
        assert time.perf_counter() - t0 < 10
        _assert_one_line(
            code,
            err,
            flag,
            "GiB with gradients, momentum and a checkpoint copy",
            "more than the 1.0 GiB free on cpu",
            "lower --width (or --depth)",
        )


def test_a_batch_too_large_for_memory_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """A CIFAR-shaped problem whose model fits but whose batch does not: --batch-size is named, with
    the batch (at most the training samples) and the activation floats of a sample; a smaller batch
    on the same memory is taken. Before, nothing checked the batch."""
    from ncfast.train import trainer as trainer_mod
    from ncfast.train.models import footprint

    write_cifar(tmp_path / "data", "cifar10", "folder", monkeypatch, n_train=60, n_test=20)
    params, floats = footprint("resnet18", 10, 3, 32, width=8)
    free = params * 16 + 16 * floats * 4  # the model and 16 samples' activations
    monkeypatch.setattr(trainer_mod, "available_bytes", lambda device: free)
    base = {
        "dataset": "cifar10",
        "data": str(tmp_path / "data"),
        "arch": "resnet18",
        "width": 8,
        "epochs": 1,
        "progress": False,
        "out": str(tmp_path / "run"),
    }
    Trainer(Config(batch_size=16, **base))  # fits
    with pytest.raises(ValueError, match=r"^--batch-size 17: a batch of 17 samples"):
        Trainer(Config(batch_size=17, **base))
    code, err = _cli(
        [
            "--dataset",
            "cifar10",
            "--data",
            str(tmp_path / "data"),
            "--arch",
            "resnet18",
            "--width",
            "8",
            "--batch-size",
            str(10**9),
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    _assert_one_line(
        code, err, f"--batch-size {10**9}: a batch of 60 samples x {floats:,} activation floats", "lower --batch-size"
    )


def test_the_memory_check_admits_the_readme_runs(monkeypatch):
    """The estimate is honest: the README's runs (digits ResNet-18 batch 128; CIFAR ResNet-18 width
    64 batch 128, the other families too) pass on a machine with 24 GB free, with room to spare."""
    from ncfast.train import trainer as trainer_mod
    from ncfast.train.models import footprint

    params, floats = footprint("resnet18", 10, 3, 32)
    assert params * 16 + 128 * floats * 4 < 2 * 2**30  # about 0.8 GiB of 24 GB
    monkeypatch.setattr(trainer_mod, "available_bytes", lambda device: 24 * 10**9)
    for arch, channels, size, n in (
        ("resnet18", 1, (8, 8), 1437),
        ("resnet18", 3, (32, 32), 50000),
        ("vgg11", 3, (32, 32), 50000),
        ("densenet121", 3, (32, 32), 50000),
        ("mlp", 1, (28, 28), 60000),
    ):
        trainer_mod.check_fits(Config(arch=arch, batch_size=128), 10, channels, size, n, "cpu")


# -------------------------------------------------------------------------------------- a full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.slow
def test_a_full_disk_keeps_the_last_checkpoint_and_names_it(tmp_path, monkeypatch, capsys):
    """A checkpoint write that fails (ENOSPC, after part of it reached the disk) is one line naming
    checkpoint.pt and the cause, exit 2; the temp file is removed and the previous checkpoint is kept
    and still resumes. Before, the OSError escaped main as a traceback."""
    out = tmp_path / "run"
    argv = [
        "--arch",
        "mlp",
        "--width",
        "32",
        "--batch-size",
        "512",
        "--clp-embed",
        "none",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert _cli(argv + ["--epochs", "1"], capsys)[0] == 0
    path = out / "checkpoint.pt"
    before = path.read_bytes()

    def partial_then_full(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"part of a checkpoint")
        _no_space()

    monkeypatch.setattr(torch, "save", partial_then_full)
    code, err = _cli(argv + ["--epochs", "2", "--resume"], capsys)
    _assert_one_line(code, err, f"{path}: could not write the checkpoint: No space left on device")
    monkeypatch.undo()
    assert path.read_bytes() == before and not (out / "checkpoint.pt.tmp").exists()
    assert torch.load(path, weights_only=True)["epoch"] == 1


def test_a_full_disk_names_the_figure(tmp_path, monkeypatch, capsys):
    """A figure that cannot be written (ENOSPC, after part of it reached the disk) is one line naming
    the figure and the cause, exit 2; the figure already there is kept, no temp file is left. Before,
    the OSError escaped main as a traceback and left the partial file in place of the figure."""
    from matplotlib.figure import Figure

    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    old = out / "figures" / "class_distance.png"
    old.write_bytes(b"the previous run's figure")

    def partial_then_full(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"part of a png")
        _no_space()

    monkeypatch.setattr(Figure, "savefig", partial_then_full)
    code, err = _cli(
        [
            "--arch",
            "mlp",
            "--width",
            "32",
            "--batch-size",
            "512",
            "--epochs",
            "1",
            "--clp-embed",
            "none",
            "--no-progress",
            "--out",
            str(out),
        ],
        capsys,
    )
    _assert_one_line(code, err, f"{old}: could not write the figure: No space left on device")
    assert old.read_bytes() == b"the previous run's figure"
    assert not list((out / "figures").glob("*.tmp"))


def test_a_diverging_run_stops_naming_the_split_and_the_epoch(tmp_path, capsys):
    """--lr 1e30 (finite, so accepted) blows the weights up in the first epoch: the run stops with one
    line naming the split, the epoch and the layer, exit 2, and writes no row for that epoch (it does
    not go on with NaN rows, nor drop them quietly)."""
    out = tmp_path / "run"
    code, err = _cli(
        [
            "--arch",
            "mlp",
            "--width",
            "32",
            "--batch-size",
            "512",
            "--dataset",
            "digits",
            "--epochs",
            "2",
            "--lr",
            "1e30",
            "--metrics-every",
            "1",
            "--clp-embed",
            "none",
            "--no-progress",
            "--out",
            str(out),
        ],
        capsys,
    )
    _assert_one_line(code, err, "measuring the train split after epoch 1: layer 'layer1'", "NaN or Inf")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
