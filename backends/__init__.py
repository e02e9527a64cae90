"""Code specific to one array library or framework (adapters, device policy, fast paths).

``shampoo_core`` itself holds only array-API code; everything that imports torch, JAX, CuPy or
SciPy by name lives here.
"""

import math


# The piece loop that NumPy's and torch's CPU fast paths share (here, so that loading one library's
# fast paths loads no module beside it).
def piecewise_norm_over_root_plus(lib, flat_f, flat_acc, epsilon: float, scratch, piece_entries: int) -> float:
    """‖f / (√acc + ε)‖₂ of the 1-D ``flat_f`` and ``flat_acc`` (one length, one dtype), each
    piece's quotient as ``f / (√acc + ε)`` rounds it in that dtype, the pieces' squares summed in
    float64 (a Python float).

    Args:
        lib: ``numpy`` or ``torch``: its ``sqrt(x, out=)``, ``divide(a, b, out=)`` and ``dot``.
        scratch: a 1-D array of ``lib`` and ``flat_f``'s dtype, of at least
            ``min(piece_entries, len(flat_f))`` entries; overwritten.
        piece_entries: entries per piece (>= 1).
    """
    n = flat_f.shape[0]
    total = 0.0
    for start in range(0, n, piece_entries):
        stop = min(start + piece_entries, n)
        piece = scratch[:stop - start]
        lib.sqrt(flat_acc[start:stop], out=piece)
        piece += epsilon
        lib.divide(flat_f[start:stop], piece, out=piece)
        total += float(lib.dot(piece, piece))
    return math.sqrt(total)


def precondition_rows(grids, preconditioners, plan, out, matmul, empty, squares) -> float:
    """The rows of ``shampoo_core.preconditioner.precondition_merged`` that NumPy's and torch's CPU
    fast paths share: each block row of each grid multiplied by its preconditioners (X_L F, then
    that times X_R: ``preconditioner._matrix_products``' order), its squares summed while it is
    in cache, and put in its place in the merged result.

    Where a group spans every column of the merged result, a row's last product is written
    straight into its place (``matmul(out=)`` of a strided view) and its squares summed over
    that contiguous slab: no copy from a scratch buffer. Other groups' rows go through scratch
    buffers and are copied (their place is not contiguous). P has the same bits either way.

    Args:
        grids: per group of ``plan``, its ``(c_0, c_1, s_0, s_1)`` grid of blocks.
        preconditioners: per group, its ``(c_0·c_1, d, d)`` preconditioners, one per
            preconditioned dim (at least one).
        plan: the parameter's ``shampoo_core.blocking.BlockPlan`` (2-D merged shape).
        out: the merged result, a C-contiguous ``plan.merged_shape`` array of the grids' dtype.
        matmul: ``matmul(a, b, out=)`` of the library (a stack of products into ``out``).
        empty: ``empty(shape)``, a scratch array of the grids' dtype and device.
        squares: the sum of squares of a contiguous array, a Python float.

    Returns:
        The sum of squares of every preconditioned block, a Python float.
    """
    total = 0.0
    for grid, factors, group in zip(grids, preconditioners, plan.groups):
        rows, cols = grid.shape[:2]
        (first, span), (height, width) = group.region, group.block_shape
        whole = span.start == 0 and span.stop == out.shape[1]  # a row's place in ``out`` is contiguous
        factors = [f.reshape((rows, cols) + tuple(f.shape[1:])) for f in factors]
        # the last product of a whole row goes straight into ``out``
        scratch = [empty((cols, height, width)) for _ in factors[:-1 if whole else None]]
        for i in range(rows):
            top = first.start + i * height
            place = out[top:top + height, span]
            target = place.reshape(height, cols, width).swapaxes(0, 1)  # the row's blocks where they lie
            piece = grid[i]
            for k, (f, buffer) in enumerate(zip(factors, scratch + [target] if whole else scratch)):
                if k == 0 and plan.preconditioned[0]:  # X_L is symmetric: the mode-0 product
                    piece = matmul(f[i], piece, out=buffer)
                else:
                    piece = matmul(piece, f[i], out=buffer)
            if whole:
                total += squares(place)
            else:
                total += squares(piece)
                target[...] = piece
    return total


def python_scalars(beta, epsilon, beta2, nesterov) -> bool:
    """Whether the scalars of ``fused_cpu.ema_plus_square_norm`` are Python numbers, as its loop
    takes them (``beta2`` and ``nesterov`` may be ``None``; a jitted step's arrays are not)."""
    scalars = (beta, epsilon) + (() if beta2 is None else (beta2,)) + tuple(nesterov or ())
    return all(isinstance(x, (int, float)) for x in scalars)


_FUSED_CPU = []  # [module or None] once looked up
_SYRK_CPU = []


def _load_once(cache: list, load, errors=(ImportError, RuntimeError)):
    """``load()`` the first time (``None`` where it raises one of ``errors``: a numba built for
    another NumPy, no place to cache a compiled loop), the same module or ``None`` after."""
    if not cache:
        try:
            module = load()
        except errors:
            module = None
        cache.append(module)
    return cache[0]


def _import_fused_cpu():
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return None
    from . import fused_cpu

    return fused_cpu


def _import_syrk_cpu():
    if load_fused_cpu() is None:  # numba imports and runs with this NumPy
        return None
    from . import syrk_cpu

    return syrk_cpu


def load_fused_cpu():
    """``backends.fused_cpu`` (numba's one-pass kernels for NumPy's and torch's CPU fast paths),
    imported at its first use; ``None`` where numba is not installed or does not import."""
    return _load_once(_FUSED_CPU, _import_fused_cpu)


def load_syrk_cpu():
    """``backends.syrk_cpu`` (a statistic's running average by BLAS's ``syrk`` with β, in a loop
    numba compiles), imported at its first use; ``None`` where numba is not installed, does not
    import, or SciPy's ``cython_blas`` does not give the routines."""
    # AttributeError, ValueError: SciPy's cython_blas without the routines
    return _load_once(_SYRK_CPU, _import_syrk_cpu, (ImportError, RuntimeError, AttributeError, ValueError))
