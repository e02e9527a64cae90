"""Inverse p-th roots of symmetric positive semi-definite statistics.

Two methods, written once against the array API:

* ``"eigh"``: symmetrize (A + Aᵀ)/2, eigendecompose, add the ridge, floor the eigenvalues at the
  ridge and form Q diag(λ^(-1/p)) Qᵀ as B·Bᵀ, B = Q diag(λ^(-1/2p)). A float32 solve that fails
  is retried in float64.
* ``"newton"``: the coupled Newton iteration of Iannazzo (Higham, *Functions of Matrices*,
  eq. 7.18) with alpha = -1/p, as used in arXiv 2002.09018, Sec. 4 ("Inverse p-th roots"):
  z = (1+p)/(2‖A‖_F), M₀ = zA, X₀ = z^(1/p) I; T = ((p+1)I - M)/p; X ← X T; M ← Tᵖ M, until
  max|M - I| <= tolerance. It stops early, keeping the previous X, when ‖M - I‖_F grows by
  ``error_growth`` or more (it cannot grow in exact arithmetic), and restarts with a 10x larger ridge while the error stays above
  ``retry_threshold``.

The ridge is ``epsilon * λmax`` (``relative_epsilon=True``) or ``epsilon``; an all-zero statistic
has λmax = 0 and falls back to the absolute ridge ``epsilon`` so that its root stays finite.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import _xp

__all__ = ["RootResult", "inverse_pth_root", "max_eigenvalue", "symmetrize"]


class RootResult(NamedTuple):
    """Result of :func:`inverse_pth_root`.

    Attributes:
        root: ``(n, n)`` array, (A + ridge I)^(-1/p), in the dtype of the input.
        error: 0-d float; Newton: max|M - I| at the end (a convergence measure, not the true
            error of the root); eigh: 0 when the result is finite. ``inf`` when non-finite.
        lambda_max: 0-d float, the largest eigenvalue estimate of the statistic.
        iterations: Newton iterations used in the final attempt (0 for eigh).
    """

    root: object
    error: float
    lambda_max: float
    iterations: int


def symmetrize(xp, a):
    """(A + Aᵀ)/2: LAPACK and cuSOLVER read only one triangle, so asymmetry would be ignored."""
    return (a + a.mT) * 0.5


def _start_vector(xp, a, squarings: int):
    """A^(2^squarings) s / ‖A^(2^squarings) s‖ for a fixed s, by normalized repeated squaring.

    Each squaring doubles the power at the cost of one matmul, so the top eigenvector's share of
    the vector grows by (λ₁/λₖ)^(2^squarings) over each other eigenvector's: a start s nearly
    orthogonal to the top eigenvector cannot hold an iteration at a lower eigenvalue. A zero
    ``a`` gives a zero vector.
    """
    n = a.shape[0]
    tiny = xp.finfo(a.dtype).smallest_normal
    b = a / xp.clip(xp.linalg.vector_norm(a), min=tiny)
    for _ in range(squarings):
        b = b @ b
        b = b / xp.clip(xp.linalg.vector_norm(b), min=tiny)
    idx = xp.astype(xp.arange(n, device=_xp.placement(a)), a.dtype)
    # Deterministic, non-constant start: the array API has no random numbers.
    v = b @ (1.0 + 0.5 * xp.cos(idx * 2.399963))
    return v / xp.clip(xp.linalg.vector_norm(v), min=tiny)


# Squarings before the power iteration: 256 steps' worth of separation for 8 matmuls, 1/10 of
# a Newton root's (docs/performance.md).
START_SQUARINGS = 8


def max_eigenvalue(xp, a, *, rtol: float = 1e-6, max_iterations: int = 100) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration, to relative tolerance.

    The iteration starts from A^256 s (:func:`_start_vector`), not from s: from a start nearly
    orthogonal to the top eigenvector the Rayleigh quotient first sits at a lower eigenvalue and
    barely moves, which the stopping rule takes for convergence (a 2×2 statistic gave 10.78 for
    11.56). The estimate is at least max(diag(A)) (a Rayleigh quotient). Returns a Python float.
    """
    v = _start_vector(xp, a, START_SQUARINGS)
    lam = 0.0
    for _ in range(max_iterations):
        w = a @ v
        new = _xp.scalar(xp.sum(v * w))
        norm = _xp.scalar(xp.linalg.vector_norm(w))
        if norm == 0.0 or not math.isfinite(norm):
            lam = new
            break
        v = w / norm
        converged = abs(new - lam) <= rtol * abs(new)
        lam = new
        if converged:
            break
    diag_max = _xp.scalar(xp.max(xp.linalg.diagonal(a)))
    return max(lam, diag_max, 0.0)


def _ridge(epsilon: float, relative: bool, lam_max: float) -> float:
    if relative and lam_max > 0.0:
        return epsilon * lam_max
    return epsilon


def _eigh_root(xp, a, p: float, epsilon: float, relative: bool):
    w, q = xp.linalg.eigh(symmetrize(xp, a))
    lam_max = max(_xp.scalar(xp.max(w)), 0.0)
    ridge = _ridge(epsilon, relative, lam_max)
    w = xp.clip(w, min=0.0) + ridge
    # B·Bᵀ with B = Q·diag(λ^(-1/2p)): a Gram product, so symmetric PSD as computed, and NumPy's
    # matmul runs it as BLAS's syrk (half the flops: 15 against 24 ms at 1024, float64)
    half = q * w ** (-0.5 / p)
    root = half @ half.mT
    finite = bool(_xp.scalar(xp.all(xp.isfinite(root))))
    return root, (0.0 if finite else math.inf), lam_max


def _matrix_power(m, k: int):
    """m**k for an integer k >= 1 by repeated squaring."""
    result = None
    base = m
    while k:
        if k & 1:
            result = base if result is None else result @ base
        k >>= 1
        if k:
            base = base @ base
    return result


def _newton_step(eye, x, m, p: int):
    """One coupled Newton step: T = ((p+1)I - M)/p; X ← X T; M ← Tᵖ M."""
    t = ((p + 1.0) * eye - m) * (1.0 / p)
    return x @ t, _matrix_power(t, p) @ m


def _newton_once(xp, a, p: int, ridge: float, tolerance: float, max_iterations: int, error_growth: float):
    n = a.shape[0]
    eye = _xp.eye_like(xp, n, a)
    a = a + ridge * eye
    norm = _xp.scalar(xp.linalg.vector_norm(a))
    if norm == 0.0 or not math.isfinite(norm):
        return eye, math.inf, 0
    z = (1.0 + p) / (2.0 * norm)
    m = z * a
    x = z ** (1.0 / p) * eye
    residual = m - eye
    error = _xp.scalar(xp.max(xp.abs(residual)))
    distance = _xp.scalar(xp.linalg.vector_norm(residual))
    iterations = 0
    while iterations < max_iterations and error > tolerance:
        new_x, new_m = _newton_step(eye, x, m, p)
        residual = new_m - eye
        new_distance = _xp.scalar(xp.linalg.vector_norm(residual))
        # In exact arithmetic ‖M - I‖_F decreases monotonically (each eigenvalue of M moves toward
        # 1), while max|M - I| may rise early on; so only the Frobenius norm detects stagnation.
        if not new_distance < error_growth * distance:
            break  # diverging or stagnating in rounding: keep the previous iterate
        x, m, distance = new_x, new_m, new_distance
        error = _xp.scalar(xp.max(xp.abs(residual)))
        iterations += 1
    return x, error, iterations


# Masked Newton iterations on lazy backends (no data-dependent exit). From the scaled start the
# iteration converges in 8-21 steps for κ up to 1e6 (see docs/algorithm.md).
LAZY_NEWTON_ITERATIONS = 32


def _lazy_ridge(xp, epsilon: float, relative: bool, lam_max):
    """:func:`_ridge` for a 0-d array ``lam_max`` (no host read)."""
    if not relative:
        return epsilon
    return xp.where(lam_max > 0.0, epsilon * lam_max, epsilon * xp.ones_like(lam_max))


def _lazy_eigh_root(xp, a, p: float, epsilon: float, relative: bool):
    w, q = xp.linalg.eigh(symmetrize(xp, a))
    lam_max = xp.clip(xp.max(w), min=0.0)
    ridge = _lazy_ridge(xp, epsilon, relative, lam_max)
    w = xp.clip(w, min=0.0) + ridge
    half = q * w ** (-0.5 / p)  # as _eigh_root
    root = half @ half.mT
    error = xp.where(xp.all(xp.isfinite(root)), 0.0 * lam_max, xp.inf * xp.ones_like(lam_max))
    return root, error, lam_max


def _lazy_max_eigenvalue(xp, a, squarings: int = START_SQUARINGS):
    """λmax without a data-dependent loop: the Rayleigh quotient of :func:`_start_vector`."""
    v = _start_vector(xp, a, squarings)
    lam = xp.sum(v * (a @ v))
    return xp.clip(xp.maximum(lam, xp.max(xp.linalg.diagonal(a))), min=0.0)


def _lazy_newton_root(xp, a, p: int, epsilon: float, relative: bool, tolerance: float, error_growth: float):
    n = a.shape[0]
    eye = _xp.eye_like(xp, n, a)
    a = symmetrize(xp, a)
    lam_max = _lazy_max_eigenvalue(xp, a)
    ridge = _lazy_ridge(xp, epsilon, relative, lam_max)
    a = a + ridge * eye
    z = (1.0 + p) / (2.0 * xp.linalg.vector_norm(a))
    m = z * a
    x = z ** (1.0 / p) * eye
    residual = m - eye
    error = xp.max(xp.abs(residual))
    distance = xp.linalg.vector_norm(residual)
    active = error > tolerance
    for _ in range(LAZY_NEWTON_ITERATIONS):
        new_x, new_m = _newton_step(eye, x, m, p)
        residual = new_m - eye
        new_distance = xp.linalg.vector_norm(residual)
        accept = active & (new_distance < error_growth * distance)  # see _newton_once
        x = xp.where(accept, new_x, x)
        m = xp.where(accept, new_m, m)
        distance = xp.where(accept, new_distance, distance)
        error = xp.where(accept, xp.max(xp.abs(residual)), error)
        active = accept & (error > tolerance)
    error = xp.where(xp.all(xp.isfinite(x)), error, xp.inf * xp.ones_like(error))
    return x, error, lam_max


def inverse_pth_root(
    a,
    p: float,
    *,
    epsilon: float = 1e-6,
    relative_epsilon: bool = True,
    method: str = "eigh",
    dtype=None,
    newton_tolerance: float | None = None,
    newton_max_iterations: int = 100,
    error_growth: float = 1.2,
    retry_threshold: float = 0.05,
    max_retries: int = 5,
) -> RootResult:
    """(A + ridge I)^(-1/p) of a symmetric PSD matrix ``a``.

    Args:
        a: ``(n, n)`` real floating array (any array-API namespace), symmetric PSD up to rounding.
        p: root order, > 0 (Shampoo uses 2k for an order-k block). Newton needs an integer.
        epsilon: ridge, >= 0; relative to λmax when ``relative_epsilon``.
        method: ``"eigh"`` or ``"newton"``.
        dtype: dtype to compute in (e.g. ``xp.float64``); defaults to the input dtype. The result
            is cast back to the input dtype.
        newton_tolerance: stop when max|M - I| <= this; default ``100 * eps(dtype)``.
        newton_max_iterations, error_growth, retry_threshold, max_retries: Newton controls.

    Returns:
        :class:`RootResult`. A failed root has ``error == inf`` (never an exception from the
        linear algebra); callers decide whether to keep it (see ``inverse_failure_threshold``).
        On lazy backends (JAX, traced arrays) ``error`` and ``lambda_max`` are 0-d arrays, the
        computation has no data-dependent branch, Newton runs ``LAZY_NEWTON_ITERATIONS`` masked
        iterations without ridge retries, and eigh has no float64 retry.

    Raises:
        ValueError: ``a`` not square 2-D, ``p <= 0``, non-integer ``p`` for Newton, ``epsilon < 0``,
            or an unknown ``method``.
    """
    xp = _xp.namespace(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square 2-D matrix; got shape {tuple(a.shape)}")
    if not p > 0:
        raise ValueError(f"p must be > 0; got {p!r}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon!r}")
    out_dtype = a.dtype
    work = a if dtype is None else xp.astype(a, dtype)
    if method not in ("eigh", "newton"):
        raise ValueError(f"method must be 'eigh' or 'newton'; got {method!r}")
    if method == "newton" and float(p) != int(p):
        raise ValueError(f"p must be an integer for method='newton'; got {p!r}")
    if newton_tolerance is None:
        newton_tolerance = 100.0 * xp.finfo(work.dtype).eps

    if _xp.is_lazy(a):
        if method == "eigh":
            root, error, lam_max = _lazy_eigh_root(xp, work, p, epsilon, relative_epsilon)
        else:
            root, error, lam_max = _lazy_newton_root(
                xp, work, int(p), epsilon, relative_epsilon, newton_tolerance, error_growth
            )
        return RootResult(xp.astype(root, out_dtype), error, lam_max, 0)

    if method == "eigh":
        try:
            root, error, lam_max = _eigh_root(xp, work, p, epsilon, relative_epsilon)
        except Exception:  # LAPACK/cuSOLVER failure types differ per backend
            root, error, lam_max = None, math.inf, math.nan
        if not math.isfinite(error) and work.dtype != xp.float64 and _xp.supports_float64(
            xp, _xp.device_of(a)
        ):
            try:
                root, error, lam_max = _eigh_root(xp, xp.astype(a, xp.float64), p, epsilon, relative_epsilon)
            except Exception:
                root, error = None, math.inf
        if root is None:
            root = _xp.eye_like(xp, a.shape[0], a)
        return RootResult(xp.astype(root, out_dtype), error, lam_max, 0)

    p = int(p)
    work = symmetrize(xp, work)
    lam_max = max_eigenvalue(xp, work)
    ridge = _ridge(epsilon, relative_epsilon, lam_max)
    best = None
    for _ in range(max_retries + 1):
        x, error, iterations = _newton_once(
            xp, work, p, ridge, newton_tolerance, newton_max_iterations, error_growth
        )
        if best is None or error < best[1]:
            best = (x, error, iterations)
        if error <= retry_threshold:
            break
        ridge = ridge * 10.0 if ridge > 0.0 else max(lam_max, 1.0) * 1e-12
    x, error, iterations = best
    if not bool(_xp.scalar(xp.all(xp.isfinite(x)))):
        error = math.inf
    return RootResult(xp.astype(x, out_dtype), error, lam_max, iterations)
