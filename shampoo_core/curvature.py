"""Layer curvature for the Eva family and K-FAC from per-sample layer inputs and output gradients.

What ``sc.eva`` and ``sc.kfac`` take as ``curvature`` for one layer whose weight and bias are one
matrix [W | b] of shape (m, n + 1), the bias being an extra input column of ones (Eva paper,
Sec. 3). The framework adapters (``backends.torch_curvature``, ``backends.jax_curvature``) collect
the rows; this computes the statistics once for every array library.
"""

from __future__ import annotations

from . import _xp

__all__ = ["layer_curvature"]


def layer_curvature(xp, kind: str, a, g, batch: int):
    """Curvature of one layer from its sample rows.

    Args:
        kind: ``"eva"`` (vectors) or ``"kfac"`` (second moments).
        a: layer inputs, shape (samples, n), one row per sample; a convolution's patch positions
            count as samples, so samples = batch × positions.
        g: gradients of the layer output of a batch-mean loss, shape (samples, m), rows aligned
            with ``a``.
        batch: the batch size.

    Returns:
        ``"eva"``: (ḡ of shape (m,), ā of shape (n + 1,)): the per-sample output gradient (the
        gradient of the mean loss times ``batch``) averaged over the batch and summed over
        positions, and the mean input with a trailing 1. ``"kfac"``: (S of shape (m, m), A of
        shape (n + 1, n + 1)), the second moments of the same rows over all samples. The dtype
        and device of ``a``.

    Raises:
        ValueError: ``kind`` is neither.
    """
    if kind not in ("eva", "kfac"):
        raise ValueError(f"kind must be 'eva' or 'kfac'; got {kind!r}")
    ones = xp.ones((a.shape[0], 1), dtype=a.dtype, device=_xp.placement(a))
    a = xp.concat([a, ones], axis=1)
    g = g * batch
    if kind == "eva":
        positions = a.shape[0] // batch
        return xp.mean(g, axis=0) * positions, xp.mean(a, axis=0)
    return g.mT @ g / g.shape[0], a.mT @ a / a.shape[0]
