"""ClassMoments: read-outs against the reference, exact merging, sync across processes."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ncfast
from helpers import assert_close, make_data
from ncfast import _C
from ncfast import reference as ref


def _state_close(a: ncfast.ClassMoments, b: ncfast.ClassMoments, rtol=1e-10, atol=None):
    """a against b; atol is relative to each statistic's largest magnitude (rtol where not given)."""
    atol = rtol if atol is None else atol
    assert torch.equal(a.count, b.count)
    scale = float(b.mean.abs().max())
    for k in ("mean", "unit_sum"):
        if getattr(b, k) is not None:
            assert_close(getattr(a, k).numpy(), getattr(b, k).numpy(), rtol=rtol, atol=atol * scale, what=k)
    for k in ("m2", "norm_sum", "scatter", "wscatter"):
        assert (getattr(a, k) is None) == (getattr(b, k) is None), k
        if getattr(b, k) is not None:
            ref_k = getattr(b, k).numpy()
            assert_close(getattr(a, k).numpy(), ref_k, rtol=rtol, atol=atol * np.abs(ref_k).max(), what=k)


@pytest.mark.parametrize("weighting", ["balanced", "sample"])
@pytest.mark.parametrize("imbalanced", [False, True])
def test_readouts_match_reference(weighting, imbalanced):
    x, y, c = make_data(n=500, d=7, c=5, imbalanced=imbalanced, absent=(1,), seed=2)
    m = ncfast.class_moments(x, y, weighting=weighting)
    assert m.counts.tolist() == ref.class_counts(y, c).tolist()
    assert m.absent_classes == [1]
    assert_close(m.means.numpy(), ref.class_means(x, y), rtol=1e-12, what="means")
    assert_close(m.variances.numpy(), ref.class_variances(x, y), rtol=1e-10, what="variances")
    assert_close(
        m.global_mean(weighting).numpy(),
        ref.global_mean(x, y, weighting=weighting),
        rtol=1e-12,
        atol=1e-14,
        what="mu_G",
    )
    for got, want in (
        (m.sigma_w(weighting), ref.within_class_covariance(x, y, weighting=weighting)),
        (m.sigma_b(weighting), ref.between_class_covariance(x, y, weighting=weighting)),
        (m.sigma_t(weighting), ref.total_covariance(x, y, weighting=weighting)),
    ):
        assert_close(got.numpy(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    units = x.double() / x.double().norm(dim=1, keepdim=True)
    want_units = torch.zeros(c, 7, dtype=torch.float64).index_add_(0, y, units)
    assert_close(m.unit_sums.numpy(), want_units.numpy(), rtol=1e-12, atol=1e-13)


def test_balanced_sigma_w_on_imbalanced_stream_needs_class_counts():
    x, y, c = make_data(n=400, c=4, imbalanced=True)
    plain = ncfast.ClassMoments(c, x.shape[1]).update(x, y)
    with pytest.raises(ValueError, match="class_counts"):
        plain.sigma_w("balanced")
    assert_close(plain.sigma_w("sample").numpy(), ref.within_class_covariance(x, y, weighting="sample"), rtol=1e-9)
    counted = ncfast.ClassMoments(c, x.shape[1], class_counts=torch.bincount(y, minlength=c))
    for lo in range(0, 400, 64):
        counted.update(x[lo : lo + 64], y[lo : lo + 64])
    assert_close(counted.sigma_w("balanced").numpy(), ref.within_class_covariance(x, y), rtol=1e-9)
    wrong = ncfast.ClassMoments(c, x.shape[1], class_counts=torch.full((c,), 100)).update(x, y)
    with pytest.raises(ValueError, match="class_counts"):
        wrong.sigma_w("balanced")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("imbalanced", [False, True])
def test_one_shot_without_pooled_scatter_keeps_the_balanced_one(backend, imbalanced, monkeypatch):
    """nc_metrics' moments (pooled=False): on imbalanced labels only the balanced scatter is taken,
    equal to the full state's; on equal counts the pooled one is the balanced Sigma_W and is kept."""
    from ncfast import backends
    from ncfast.stats import ClassMoments

    impl = backends.get(backend)
    x, y, c = make_data(n=500, d=7, c=5, imbalanced=imbalanced, seed=3)
    if not imbalanced:
        x, y = x[:450], torch.arange(450) % c
    full = ClassMoments._of_batch(x, y, c, impl, scatter=True, unit_sums=True, balanced=True)
    lean = ClassMoments._of_batch(x, y, c, impl, scatter=True, unit_sums=True, balanced=True, pooled=False)
    assert lean.has_scatter and (lean.wscatter is not None) == imbalanced
    assert (lean.scatter is None) == imbalanced
    assert_close(lean.sigma_w("balanced").numpy(), ref.within_class_covariance(x, y), rtol=1e-10)
    assert_close(lean.sigma_w("balanced").numpy(), full.sigma_w("balanced").numpy(), rtol=1e-12)
    if imbalanced:
        with pytest.raises(ValueError, match="weighting"):
            lean.sigma_w("sample")
    got, want = ncfast.metrics_from_moments(lean), ncfast.metrics_from_moments(full)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-10, abs=1e-14), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shards_merged_in_any_order_equal_one_shot(seed):
    x, y, c = make_data(n=700, d=9, c=6, imbalanced=True, spread=1e-3, shift=50.0, seed=seed)
    counts = torch.bincount(y, minlength=c)
    one = ncfast.ClassMoments(c, 9, class_counts=counts).update(x, y)
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randint(1, 699, (5,), generator=g).tolist())
    bounds = [0, *cuts, 700]
    shards = [ncfast.ClassMoments(c, 9, class_counts=counts).update(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
    order = torch.randperm(len(shards), generator=g).tolist()
    acc = shards[order[0]].clone()
    for i in order[1:]:
        acc.merge(shards[i])
    _state_close(acc, one)
    # batch-by-batch updates of a shuffled stream, too
    perm = torch.randperm(700, generator=g)
    stream = ncfast.ClassMoments(c, 9, class_counts=counts)
    for lo in range(0, 700, 33):
        stream.update(x[perm[lo : lo + 33]], y[perm[lo : lo + 33]])
    _state_close(stream, one)


def test_state_dict_round_trip_and_clone():
    x, y, c = make_data()
    m = ncfast.class_moments(x, y)
    restored = ncfast.ClassMoments.from_state_dict(m.state_dict())
    _state_close(restored, m, rtol=0)
    twin = m.clone()
    twin.update(x[:5], y[:5])
    assert int(m.count.sum()) == x.shape[0]  # the clone does not share state


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_unit_sums_off_keeps_every_other_statistic(monkeypatch, backend):
    """unit_sums=False drops exactly the unit-vector and norm sums: the rest of the state, its
    merges, its state_dict and every metric but cosine_separation and feature_norm stay the same."""
    monkeypatch.setenv("NCFAST_BACKEND", backend)
    x, y, c = make_data(n=700, d=9, c=6, imbalanced=True, spread=1e-3, shift=50.0, seed=5)
    full = ncfast.class_moments(x, y)
    bare = ncfast.class_moments(x, y, unit_sums=False)
    assert bare.unit_sum is None and bare.norm_sum is None
    with pytest.raises(ValueError, match="unit_sums=False"):
        bare.unit_sums  # noqa: B018  (the property raises)
    for k in ("mean", "m2", "scatter", "wscatter"):
        assert_close(getattr(bare, k).numpy(), getattr(full, k).numpy(), rtol=1e-13, atol=1e-13, what=k)
    assert torch.equal(bare.count, full.count)
    assert_close(bare.variances.numpy(), ref.class_variances(x, y), rtol=1e-10, what="variances")
    want = ncfast.metrics_from_moments(full)
    got = ncfast.metrics_from_moments(bare)
    assert set(want) - set(got) == {"cosine_separation", "feature_norm"}
    for k in got:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k
    # shards merged, then a state_dict round trip and a clone, against the one-shot state
    counts = torch.bincount(y, minlength=c)
    shards = [
        ncfast.ClassMoments(c, 9, unit_sums=False, class_counts=counts).update(x[a:b], y[a:b])
        for a, b in ((0, 123), (123, 450), (450, 700))
    ]
    acc = shards[2].clone().merge(shards[0]).merge(shards[1])
    _state_close(acc, bare)
    _state_close(ncfast.ClassMoments.from_state_dict(acc.state_dict()), acc, rtol=0)
    with pytest.raises(ValueError, match="unit_sums"):
        acc.merge(ncfast.ClassMoments(c, 9, class_counts=counts).update(x, y))
    with pytest.raises(ValueError, match="unit_sums"):
        ncfast.ClassMoments(c, 9, class_counts=counts).load_state_dict(acc.state_dict())


def test_cpp_and_torch_backends_agree(monkeypatch, tolerance):
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x, y, c = make_data(n=300, d=5, c=4, dtype=dtype)
        monkeypatch.setenv("NCFAST_BACKEND", "cpp")
        a = ncfast.class_moments(x, y)
        monkeypatch.setenv("NCFAST_BACKEND", "torch")
        b = ncfast.class_moments(x, y)
        atol, rtol = tolerance(dtype)
        _state_close(a, b, rtol=rtol, atol=atol)


def test_streamed_updates_merge_alike_on_cpp_and_torch(monkeypatch):
    """Batches fed to ClassMoments merge in place on the C++ backend (its scatters corrected by the
    same per-class delta and weight) and out of place on the torch one: the same state, the
    balanced scatter of announced counts included, with classes that appear only in later batches."""
    x, y, c = make_data(n=500, d=6, c=5, imbalanced=True, seed=21, shift=50.0, dtype=torch.float64)
    order = torch.argsort(y, stable=True)  # sorted by class: the first batches hold only the first classes
    x, y = x[order], y[order]
    counts = torch.bincount(y, minlength=c)
    states = {}
    for name in ("cpp", "torch"):
        monkeypatch.setenv("NCFAST_BACKEND", name)
        m = ncfast.ClassMoments(c, 6, class_counts=counts)
        for lo in range(0, 500, 70):
            m.update(x[lo : lo + 70], y[lo : lo + 70])
        states[name] = m
    _state_close(states["cpp"], states["torch"], rtol=1e-12)
    one_shot = ncfast.ClassMoments(c, 6, class_counts=counts).update(x, y)
    _state_close(states["cpp"], one_shot, rtol=1e-10)


def test_thread_count_changes_result_only_by_rounding():
    """Classes cut by thread boundaries are merged with Chan's formula: equal to float64 rounding."""
    x, y, c = make_data(n=5000, d=16, c=3, seed=9, shift=100.0)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ncfast.class_moments(x, y)
        torch.set_num_threads(2)
        two = ncfast.class_moments(x, y)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one.count, two.count)
    _state_close(two, one, rtol=1e-13)


def test_compile_options_reports_build():
    opts = ncfast.compile_options()
    simd, threads = _C.simd(), _C.openmp_threads()
    assert simd in ("AVX512", "AVX2", "SSE4.2", "NEON", "generic")
    assert isinstance(threads, int) and threads >= 0
    openmp = f"OpenMP=ON(max_threads={threads})" if threads else "OpenMP=OFF"
    bf16 = "BF16=ON" if _C.ncc_has_precision("bf16") else "BF16=OFF"
    isa = "" if ncfast._C_LEVEL == "native" else f" ISA={ncfast._C_LEVEL}"
    assert opts == f"{openmp} SIMD={simd} {bf16}{isa}"


def _distributed_worker(rank, world, init_file, x, y, c, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counts = torch.bincount(y, minlength=c)
        part = slice(0, 250) if rank == 0 else slice(250, None)
        m = ncfast.ClassMoments(c, x.shape[1], class_counts=counts).update(x[part], y[part])
        m.all_reduce()
        bare = ncfast.ClassMoments(c, x.shape[1], scatter=False, unit_sums=False).update(x[part], y[part])
        bare.all_reduce()
        metric = ncfast.NeuralCollapse(c, x.shape[1], class_counts=counts)
        metric.update(x[part], y[part])
        torch.save(
            {"state": m.state_dict(), "bare": bare.state_dict(), "metric": dict(metric.compute())}, f"{out_file}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_process_gloo_equals_one_shot():
    pytest.importorskip("torchmetrics")
    x, y, c = make_data(n=600, d=6, c=5, imbalanced=True, spread=1e-4, shift=1e3, seed=4)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        out_file = os.path.join(tmp, "state")
        mp.spawn(_distributed_worker, args=(2, init_file, x, y, c, out_file), nprocs=2, join=True)
        saved = [torch.load(f"{out_file}.{r}") for r in range(2)]
    one = ncfast.ClassMoments(c, 6, class_counts=torch.bincount(y, minlength=c)).update(x, y)
    one_bare = ncfast.ClassMoments(c, 6, scatter=False, unit_sums=False).update(x, y)
    want = ncfast.metrics_from_moments(one)
    for r in range(2):
        _state_close(ncfast.ClassMoments.from_state_dict(saved[r]["state"]), one)
        _state_close(ncfast.ClassMoments.from_state_dict(saved[r]["bare"]), one_bare)
        # NeuralCollapse syncs through torchmetrics' gather and its Chan-merge reduction
        for k, v in want.items():
            assert saved[r]["metric"][k] == pytest.approx(v, rel=1e-9, abs=1e-15), k


@pytest.mark.parametrize("shape", [(3, 5), (1000, 300)])  # numpy's zeros, and a fresh mapping
def test_cpu_zero_states_are_zero_and_writable(shape):
    from ncfast.stats import _MAPPED_ZEROS_BYTES, _cpu_zeros

    z = _cpu_zeros(*shape)
    assert z.shape == shape and z.dtype == torch.float64 and z.is_contiguous()
    assert (shape[0] * shape[1] * 8 >= _MAPPED_ZEROS_BYTES) == (shape == (1000, 300))
    assert not bool(z.any())
    z += 1.5
    assert bool((z == 1.5).all())
