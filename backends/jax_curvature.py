"""Eva / K-FAC curvature for JAX models: zero taps on layer outputs, bias folded into the weight.

The JAX counterpart of ``backends.torch_curvature``. Model code routes each layer to be curved
through ``taps.dense(w, x)``; ``w`` is a parameter leaf of shape (m, n + 1) = [weight | bias], the
bias being an extra input column of ones (Eva paper, Sec. 3), and ``x`` is the layer input of shape
(batch, ..., n) (extra axes count as samples). Convolutions go through ``taps.conv2d(w, x,
kernel_size)``, which cuts ``x`` into patches and applies ``dense`` to them, so the curvature of a
kernel is that of a dense layer over patch positions (as ``backends.torch_curvature`` does). The layer output is
``x @ w[:, :n].T + w[:, n]`` plus a zero "tap" whose gradient is the gradient of the layer output,
so one ``jax.value_and_grad`` gives the parameter gradients and every layer's output gradients.

    def loss_fn(params, taps, x, y):
        h = jnp.tanh(taps.dense(params["w1"], x))
        return jnp.mean((taps.dense(params["w2"], h) - y) ** 2)

    loss, grads, curvature = value_grads_and_curvature(loss_fn, params, x, y, kind="eva")
    updates, state = tx.update(state, grads, params, curvature=curvature)

Everything is traceable: the whole step can sit under ``jax.jit`` (``sc.eva`` and ``sc.kfac``
read nothing back to the host on traced arrays). For evaluation, pass ``Taps()`` (plain layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from backends import jax_backend  # noqa: F401  (lax.cond gates K-FAC's decompositions under jit)
from shampoo_core.curvature import layer_curvature

__all__ = ["Taps", "value_grads_and_curvature"]


class Taps:
    """Layer helper passed to the loss function; ``Taps()`` alone computes plain dense layers."""

    def __init__(self, leaf_index=None, perturbations=None):
        self._leaf_index = leaf_index  # id(parameter tracer) -> leaf position, while collecting
        self._perturbations = perturbations
        self.inputs: dict = {}  # leaf position -> layer input
        self.outputs: dict = {}  # leaf position -> layer output (shape discovery)

    def dense(self, w, x):
        """``x @ w[:, :-1].T + w[:, -1]`` for ``w`` (m, n + 1) and ``x`` (batch, ..., n).

        Raises:
            ValueError: ``w`` is not 2-D, or its width is not ``x.shape[-1] + 1``; while collecting,
                ``w`` is not a parameter leaf passed unchanged (so its curvature has no place).
        """
        if w.ndim != 2 or w.shape[1] != x.shape[-1] + 1:
            raise ValueError(f"w must have shape (m, {x.shape[-1] + 1}) for an input of width {x.shape[-1]} "
                             f"(weight and bias as one matrix); got {tuple(w.shape)}")
        y = x @ w[:, :-1].T + w[:, -1]
        if self._leaf_index is None:
            return y
        index = self._leaf_index.get(id(w))
        if index is None:
            raise ValueError("taps.dense needs a parameter leaf passed unchanged as w (not a slice or transpose)")
        self.inputs[index] = x
        self.outputs[index] = y
        if self._perturbations is not None:
            y = y + self._perturbations[index]
        return y

    def conv2d(self, w, x, kernel_size, *, stride=(1, 1), padding="VALID"):
        """2-D convolution of ``x`` (batch, c, h, w) NCHW with ``w`` (m, c·kh·kw + 1) = [kernel | bias].

        The kernel is flattened channel-major, ``kernel.reshape(m, c * kh * kw)`` of an OIHW
        kernel (m, c, kh, kw), the order of ``jax.lax.conv_general_dilated_patches``' features.
        ``stride`` and ``padding`` are those of ``jax.lax.conv_general_dilated``.

        Returns:
            (batch, m, h', w'), the convolution plus the bias.

        Raises:
            ValueError: ``x`` is not 4-D, or ``w`` does not match (see :meth:`dense`).
        """
        if x.ndim != 4:
            raise ValueError(f"x must be (batch, channels, height, width); got shape {tuple(x.shape)}")
        patches = jax.lax.conv_general_dilated_patches(x, tuple(kernel_size), tuple(stride), padding)
        y = self.dense(w, jnp.moveaxis(patches, 1, -1))  # (batch, h', w', m)
        return jnp.moveaxis(y, -1, 1)


def _statistics(kind, a, g):
    """Curvature of one layer from its input ``a`` (batch, ..., n) and output gradient ``g``."""
    rows_a, rows_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return layer_curvature(jnp, kind, rows_a, rows_g, a.shape[0])


def value_grads_and_curvature(loss_fn, params, *args, kind: str = "eva"):
    """Loss, gradients and curvature of ``loss_fn(params, taps, *args)`` (a batch-mean scalar).

    Returns:
        ``(loss, grads, curvature)``; ``curvature`` has the tree structure of ``params`` (any JAX
        pytree): ``None``
        for leaves not passed to ``taps.dense``, else ``(g_bar, a_bar)`` (``kind="eva"``: the
        batch-mean per-sample output gradient (m,) and mean input with a trailing 1 (n + 1,)) or
        ``(S, A)`` (``kind="kfac"``: (m, m) and (n + 1, n + 1) second moments), as ``sc.eva`` and
        ``sc.kfac`` take them.

    Raises:
        ValueError: ``kind`` not "eva" or "kfac"; errors of :meth:`Taps.dense`.
    """
    if kind not in ("eva", "kfac"):
        raise ValueError(f"kind must be 'eva' or 'kfac'; got {kind!r}")
    leaves, spec = jax.tree_util.tree_flatten(params)  # JAX's registry: flax structs, equinox modules

    def run(leaves, perturbations):
        taps = Taps({id(w): i for i, w in enumerate(leaves)}, perturbations)
        loss = loss_fn(jax.tree_util.tree_unflatten(spec, leaves), taps, *args)
        return loss, (taps.inputs, taps.outputs)

    _, (_, outputs) = jax.eval_shape(run, leaves, None)  # layer output shapes, nothing computed
    zeros = {i: jnp.zeros(s.shape, s.dtype) for i, s in outputs.items()}
    (loss, (inputs, _)), (grads, out_grads) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(leaves, zeros)
    curvature = [_statistics(kind, inputs[i], out_grads[i]) if i in inputs else None for i in range(len(leaves))]
    return loss, jax.tree_util.tree_unflatten(spec, grads), jax.tree_util.tree_unflatten(spec, curvature)
