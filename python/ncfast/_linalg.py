"""Symmetric eigendecompositions and SVDs that do not raise on valid input (docs/metrics.md "Bad input").

Every eigen- or singular-value decomposition on a path from a public ncfast function goes through
this module. Each function returns what its ``torch.linalg`` namesake returns, in the input's
dtype and on its device, and guarantees two things beyond it:

1. Exactly zero rows and columns are taken out before decomposing (``sym_eigh``, ``sym_eigvalsh``).
   A symmetric matrix whose row j and column j are both zero has e_j as an eigenvector with
   eigenvalue 0, exactly, so the spectrum is the spectrum of the remaining block plus that many
   zeros. The scatter matrices of a ReLU layer with dead units have hundreds of such rows, and
   LAPACK's divide-and-conquer driver (``syevd``, which ``torch.linalg.eigh`` calls on the CPU;
   MKL in the PyPI wheels) stops with "failed to converge" on some of them although the problem
   is perfectly conditioned. The smaller block is also cheaper to decompose.
2. When torch's solver still raises ``torch.linalg.LinAlgError`` or returns a non-finite value,
   the same float64 problem is solved on the CPU by other LAPACK drivers through scipy (whose
   LAPACK is a different build from torch's): for eigenvalues the MRRR driver ``syevr``, then
   the QR iteration ``syev``, then an SVD (``gesvd``); for singular values ``gesdd``, then
   ``gesvd``, then the eigendecomposition of the Gram matrix on the smaller side. Only when
   every one of them fails is an error raised. Non-finite input gets torch's answer (or error)
   unchanged: no solver can do better with it, and the callers exclude it.

The last resort for a symmetric matrix, the SVD, returns its eigenvalues up to sign: the sign of
each is taken from u_k . v_k. That is exact for the positive semi-definite matrices ncfast
decomposes (scatters and Gram matrices, whose negative eigenvalues are rounding noise); for an
indefinite matrix with eigenvalues +t and -t the pair can be mixed.

The fast path, a matrix without zero rows on which torch succeeds, costs one comparison of the
matrix with zero (O(n^2)) and one finiteness check over the result beyond the torch call.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import ThreadpoolController

__all__ = [
    "blas_threads",
    "live_coordinates",
    "pivoted_cholesky",
    "triangular_inverse",
    "sym_eigh",
    "sym_eigvalsh",
    "svd_left",
    "svdvals",
]

_BLAS_CONTROLLER = None


def blas_threads(limit: int):
    """A context holding scipy's BLAS and LAPACK to ``limit`` threads (torch's count, so that
    ``torch.set_num_threads`` governs them too), from one threadpoolctl controller: a
    ``threadpool_limits`` per call rescans the process's libraries, 2.5 ms each."""
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        _BLAS_CONTROLLER = ThreadpoolController()
    return _BLAS_CONTROLLER.limit(limits=limit, user_api="blas")


_EIG_DRIVERS = ("evr", "ev")  # MRRR, then the QR iteration: neither is divide and conquer
_SVD_DRIVERS = ("gesdd", "gesvd")


def live_coordinates(sym: torch.Tensor, *factors: torch.Tensor):
    """Indices j where row j or column j of the square ``sym``, or column j of a factor, is not
    exactly zero; None when that is every index (nothing to take out).

    Coordinates left out carry an exact zero in ``sym`` and in every ``factor.T @ factor``. NaN
    counts as non-zero, so it is never hidden by the deflation."""
    nonzero = sym != 0
    live = nonzero.any(dim=0) | nonzero.any(dim=1)
    for f in factors:
        live |= (f != 0).any(dim=0)
    if bool(live.all()):
        return None
    return live.nonzero().squeeze(1)


def _finite(*ts: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def _to_host(a: torch.Tensor) -> np.ndarray:
    return a.detach().to(device="cpu", dtype=torch.float64).numpy()


def _back(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=like.device, dtype=like.dtype)


def _host_eigh(host: np.ndarray, vectors: bool):
    """Ascending (w, V) or w of the symmetric matrix whose lower triangle is ``host``, by scipy's
    non-divide-and-conquer drivers, then by an SVD; raises LinAlgError if all fail."""
    failures = []
    for driver in _EIG_DRIVERS:
        try:
            out = scipy.linalg.eigh(host, lower=True, eigvals_only=not vectors, driver=driver, check_finite=False)
        except (np.linalg.LinAlgError, ValueError) as e:
            failures.append(f"scipy {driver}: {e}")
            continue
        if np.isfinite(out[0] if vectors else out).all():
            return out
        failures.append(f"scipy {driver}: non-finite result")
    full = np.tril(host) + np.tril(host, -1).T
    try:
        u, s, vt = scipy.linalg.svd(full, lapack_driver="gesvd", check_finite=False)
    except (np.linalg.LinAlgError, ValueError) as e:
        failures.append(f"scipy gesvd: {e}")
        raise np.linalg.LinAlgError("no symmetric eigensolver converged: " + "; ".join(failures)) from None
    # symmetric A = U S V^T with v_k = sign(lambda_k) u_k: the sign is that of u_k . v_k
    w = s * np.where(np.einsum("ik,ki->k", u, vt) < 0, -1.0, 1.0)
    order = np.argsort(w, kind="stable")
    return (w[order], u[:, order]) if vectors else w[order]


def _dense_eigh(a: torch.Tensor, vectors: bool):
    """torch.linalg.eigh / eigvalsh of a, or the scipy fallbacks when it raises or returns a
    non-finite value."""
    try:
        out = torch.linalg.eigh(a) if vectors else torch.linalg.eigvalsh(a)
        if _finite(*out) if vectors else _finite(out):
            return out
    except torch.linalg.LinAlgError:
        if not _finite(a):
            raise
    if not _finite(a):  # NaN or Inf in, NaN out: no other solver does better
        return out
    try:
        out = _host_eigh(_to_host(a), vectors)
    except np.linalg.LinAlgError as e:
        raise torch.linalg.LinAlgError(str(e)) from None
    return (_back(out[0], a), _back(out[1], a)) if vectors else _back(out, a)


def _sym(a: torch.Tensor, vectors: bool):
    n = a.shape[0]
    if n == 0:
        return (a.new_zeros(0), a.new_zeros(0, 0)) if vectors else a.new_zeros(0)
    live = live_coordinates(a)
    if live is None:
        return _dense_eigh(a, vectors)
    k = live.numel()
    if k == 0:
        w_live, v_live = a.new_zeros(0), a.new_zeros(0, 0)
    elif vectors:
        w_live, v_live = _dense_eigh(a[live][:, live], True)
    else:
        w_live = _dense_eigh(a[live][:, live], False)
    w = torch.cat([w_live, a.new_zeros(n - k)])
    order = torch.argsort(w, stable=True)
    if not vectors:
        return w[order]
    dead = torch.ones(n, dtype=torch.bool, device=a.device)
    dead[live] = False
    dead = dead.nonzero().squeeze(1)
    v = a.new_zeros(n, n)
    v[live, :k] = v_live
    v[dead, torch.arange(k, n, device=a.device)] = 1.0
    return w[order], v[:, order]


def sym_eigh(a: torch.Tensor):
    """(w, V): ascending eigenvalues and orthonormal eigenvectors (columns) of the symmetric
    matrix whose lower triangle is ``a``, as torch.linalg.eigh. Exactly zero rows and columns
    are deflated (their eigenvectors are the unit vectors e_j, eigenvalue 0), and a failed or
    non-finite torch solve falls back to scipy's drivers (module docstring)."""
    return _sym(a, True)


def sym_eigvalsh(a: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of symmetric ``a``, as torch.linalg.eigvalsh, with sym_eigh's
    deflation and fallbacks."""
    return _sym(a, False)


def _svd(a: torch.Tensor, vectors: bool):
    """torch's reduced SVD of a ((U, S), or S), else scipy's gesdd and gesvd; None when every one
    fails on finite input. Non-finite input gets torch's answer (or error) unchanged."""
    try:
        out = torch.linalg.svd(a, full_matrices=False)[:2] if vectors else (torch.linalg.svdvals(a),)
        if _finite(*out) or not _finite(a):
            return out if vectors else out[0]
    except torch.linalg.LinAlgError:
        if not _finite(a):
            raise
    host = _to_host(a)
    for driver in _SVD_DRIVERS:
        try:
            out = scipy.linalg.svd(
                host, full_matrices=False, compute_uv=vectors, lapack_driver=driver, check_finite=False
            )
        except (np.linalg.LinAlgError, ValueError):
            continue
        out = out[:2] if vectors else (out,)
        if all(np.isfinite(t).all() for t in out):
            return (_back(out[0], a), _back(out[1], a)) if vectors else _back(out[0], a)
    return None


def svd_left(a: torch.Tensor):
    """(U, S) of the reduced SVD a = U diag(S) V^T: U is m x min(m, n), S descending, as
    torch.linalg.svd(a, full_matrices=False)[:2]. Falls back to scipy's gesdd, then gesvd, then
    the eigendecomposition of the m x m Gram a a^T (S = sqrt of its largest min(m, n)
    eigenvalues, clamped at 0: accurate to eps * ||a|| absolutely, not relatively)."""
    out = _svd(a, True)
    if out is not None:
        return out
    m, n = a.shape
    w, v = sym_eigh(a @ a.T)
    k = min(m, n)
    w, v = w.flip(0)[:k], v.flip(1)[:, :k]
    return v, w.clamp_min(0.0).sqrt()


def svdvals(a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``a``, descending, as torch.linalg.svdvals; falls back to scipy's
    gesdd, then gesvd, then the square roots of the eigenvalues of the Gram matrix on the smaller
    side (clamped at 0; accurate to eps * ||a|| absolutely)."""
    out = _svd(a, False)
    if out is not None:
        return out
    m, n = a.shape
    return sym_eigvalsh(a @ a.T if m <= n else a.T @ a).flip(0).clamp_min(0.0).sqrt()


def pivoted_cholesky(a: torch.Tensor, max_rank: int | None = None):
    """(M, rest): a = M M^T + S with M n x k from the Cholesky factorisation of the symmetric
    positive semi-definite ``a`` with complete (diagonal) pivoting, rows in ``a``'s own order.

    The factorisation stops once no remaining diagonal entry of the Schur complement S exceeds
    n * eps * max_i a_ii (LAPACK's default for ``?pstrf``); at most ``max_rank`` columns are kept.
    ``rest`` = sum_i |a_ii - ||M_i||^2|, the trace of S up to rounding, bounds every eigenvalue of
    the part S left out (S is positive semi-definite). A matrix of rank k costs O(n^2 k) on the CPU
    (LAPACK's blocked ``dpstrf`` through scipy) and O(n k^2) elsewhere (a left-looking loop that
    reads one row of ``a`` per column), against O(n^3) for an eigendecomposition. ``rest`` is NaN
    when ``a`` holds a non-finite value.
    """
    n = a.shape[0]
    diag = a.diagonal()
    top = float(diag.max()) if n else 0.0
    if not top > 0 or not math.isfinite(top):
        m = a.new_zeros(n, 0)
        return m, (0.0 if top == 0 and _finite(a) else math.nan)
    tol = n * float(np.finfo(np.float64).eps) * top
    k_max = n if max_rank is None else max(0, min(n, int(max_rank)))
    if a.device.type == "cpu":
        m = _pstrf_host(_to_host(a), tol)[:, :k_max]
        m = torch.from_numpy(np.ascontiguousarray(m)).to(dtype=a.dtype)
    else:
        m = _pivoted_cholesky_loop(a, tol, k_max)
    rest = float((diag - m.square().sum(1)).abs().sum())
    return m, rest


def _pstrf_host(host: np.ndarray, tol: float) -> np.ndarray:
    """LAPACK dpstrf on a float64 symmetric matrix: M with rows in the input's order."""
    n = host.shape[0]
    # a symmetric C-ordered array is its own Fortran-ordered transpose: the copy is the workspace
    with blas_threads(torch.get_num_threads()):
        c, piv, rank, info = scipy.linalg.lapack.dpstrf(np.array(host, order="F"), tol=tol, lower=1, overwrite_a=1)
    if info < 0:
        raise ValueError(f"dpstrf: argument {-info} is invalid")
    lower = np.tril(c[:, :rank])
    m = np.empty((n, rank), dtype=np.float64)
    m[piv - 1] = lower
    return m


def _pivoted_cholesky_loop(a: torch.Tensor, tol: float, k_max: int) -> torch.Tensor:
    """Left-looking pivoted Cholesky: column j of M is row p_j of a minus its projection on the
    columns already taken, over the square root of the largest remaining diagonal entry p_j."""
    n = a.shape[0]
    d = a.diagonal().clone()
    rows = a.new_zeros(k_max, n)  # rows[j] = column j of M
    taken = torch.zeros(n, dtype=torch.bool, device=a.device)
    k = 0
    while k < k_max:
        rem = d.masked_fill(taken, -math.inf)
        p = int(rem.argmax())
        pivot = float(rem[p])
        if not pivot > tol:
            break
        col = a[p] - rows[:k].T @ rows[:k, p] if k else a[p].clone()
        col = col / math.sqrt(pivot)
        col[taken] = 0.0  # exactly zero in exact arithmetic: the rows already pivoted are factored
        rows[k] = col
        d -= col.square()
        taken[p] = True
        k += 1
    return rows[:k].T.contiguous()


def triangular_inverse(t: torch.Tensor, upper: bool) -> torch.Tensor:
    """The inverse of the non-singular triangular ``t`` (``upper`` or lower): LAPACK's ``dtrtri``
    through scipy on the CPU (n^3 / 3 flops; a triangular solve against the identity, as on other
    devices, does n^3)."""
    n = t.shape[0]
    if t.device.type != "cpu" or t.dtype != torch.float64:
        eye = torch.eye(n, dtype=t.dtype, device=t.device)
        return torch.linalg.solve_triangular(t, eye, upper=upper)
    host = t.detach().numpy()
    # a C-ordered triangle is the Fortran-ordered transpose, the opposite triangle: invert that
    with blas_threads(torch.get_num_threads()):
        inv, info = scipy.linalg.lapack.dtrtri(host.T, lower=int(upper))
    if info != 0:
        raise ValueError(f"dtrtri: info {info} (a zero on the diagonal)" if info > 0 else f"dtrtri: argument {-info}")
    return torch.from_numpy(np.ascontiguousarray(inv.T))
