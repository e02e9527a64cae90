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


def python_scalars(beta, epsilon, beta2, nesterov) -> bool:
    """Whether the scalars of ``fused_cpu.ema_plus_square_norm`` are Python numbers, as its loop
    takes them (``beta2`` and ``nesterov`` may be ``None``; a jitted step's arrays are not)."""
    scalars = (beta, epsilon) + (() if beta2 is None else (beta2,)) + tuple(nesterov or ())
    return all(isinstance(x, (int, float)) for x in scalars)


_FUSED_CPU = []  # [module or None] once looked up


def load_fused_cpu():
    """``backends.fused_cpu`` (numba's one-pass kernels for NumPy's and torch's CPU fast paths),
    imported at its first use; ``None`` where numba is not installed or does not import."""
    if not _FUSED_CPU:
        import importlib.util

        module = None
        if importlib.util.find_spec("numba") is not None:
            try:
                from . import fused_cpu as module
            except (ImportError, RuntimeError):  # a numba built for another NumPy, or no place
                module = None  # to cache the compiled loop (RuntimeError): the eager passes instead
        _FUSED_CPU.append(module)
    return _FUSED_CPU[0]
