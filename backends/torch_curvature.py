"""Eva / K-FAC for torch models: curvature from module hooks, bias folded into the weight.

``CurvatureOptimizer(model, tx, kind)`` wraps a transformation from ``sc.eva`` (``kind="eva"``:
vectors ā, ḡ), ``sc.kfac`` (``kind="kfac"``: factors A, S; FOOF ignores S) or ``sc.eva_s``
(``kind=None``: gradients only, no hooks) and collects what it needs with forward and backward
hooks on every ``nn.Linear`` and ``nn.Conv2d``:

* a layer's weight (out, in[, kh, kw]) and bias are one matrix [W | b] of shape (out, n + 1),
  the bias being an extra input column of ones (Eva paper, Sec. 3);
* ā is the batch mean of the layer input (conv: of the unfolded input patches over batch and
  positions) with a trailing 1; ḡ is the batch mean per-sample gradient of the layer output (conv:
  summed over positions), i.e. the gradient of a mean loss times the batch size;
* K-FAC's A = E[aaᵀ] and S = E[ggᵀ] over the same samples (conv: positions count as samples).

Parameters outside such layers get no curvature (SGD with momentum in ``sc.eva``/``sc.kfac``).
Call ``step()`` after ``loss.backward()``; the model's parameters are updated in place.
"""

from __future__ import annotations

import array_api_compat.torch as xp
import torch
import torch.nn.functional as F

from shampoo_core.curvature import layer_curvature

__all__ = ["CurvatureOptimizer"]


class CurvatureOptimizer:
    """Drive ``tx`` (``sc.eva``/``sc.kfac``) from a torch model's hooks.

    Raises:
        ValueError: ``kind`` not "eva", "kfac" or None; a step before any forward/backward pass.
    """

    def __init__(self, model: torch.nn.Module, tx, kind: str | None = "eva"):
        if kind not in ("eva", "kfac", None):
            raise ValueError(f"kind must be 'eva', 'kfac' or None; got {kind!r}")
        self.model, self.tx, self.kind = model, tx, kind
        self.layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        layer_params = {id(p) for m in self.layers for p in m.parameters(recurse=False)}
        self.others = [p for p in model.parameters() if id(p) not in layer_params]
        self._inputs: dict = {}
        self._grads: dict = {}
        for i, m in enumerate(self.layers if kind is not None else ()):
            m.register_forward_hook(lambda mod, inp, out, i=i: self._record(i, inp[0], out))
        self.state = self.tx.init(self._params())

    def _record(self, i, inp, out):
        self._inputs[i] = inp.detach()
        if out.requires_grad:  # the gradient of the layer output, when backward reaches it
            out.register_hook(lambda grad: self._grads.__setitem__(i, grad.detach()))

    @staticmethod
    def _matrix(weight, bias):
        w = weight.reshape(weight.shape[0], -1)
        b = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return torch.cat([w, b[:, None]], dim=1)

    def _params(self):
        with torch.no_grad():
            layers = [self._matrix(m.weight, m.bias) for m in self.layers]
            return {"layers": layers, "others": [p.detach() for p in self.others]}

    def _samples(self, i, m):
        """(input rows, output-gradient rows), one row per sample (conv: per position)."""
        a, g = self._inputs[i], self._grads[i]
        if isinstance(m, torch.nn.Conv2d):
            a = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = a.transpose(1, 2).reshape(-1, a.shape[1])  # (batch * positions, in * kh * kw)
            g = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
            return a, g
        return a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])

    def _curvature(self):
        out = []
        for i, m in enumerate(self.layers):
            if i not in self._inputs or i not in self._grads:
                raise ValueError("step() needs a forward and a backward pass through the model first")
            a, g = self._samples(i, m)
            out.append(layer_curvature(xp, self.kind, a, g, self._inputs[i].shape[0]))
        return {"layers": out, "others": [None] * len(self.others)}

    @torch.no_grad()
    def step(self) -> None:
        params = self._params()
        grads = {
            "layers": [self._matrix(m.weight.grad, m.bias.grad if m.bias is not None else None)
                       for m in self.layers],
            "others": [p.grad for p in self.others],
        }
        if self.kind is None:
            updates, self.state = self.tx.update(self.state, grads, params)
        else:
            updates, self.state = self.tx.update(self.state, grads, params, curvature=self._curvature())
        for m, u in zip(self.layers, updates["layers"]):
            m.weight.add_(u[:, :-1].reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.add_(u[:, -1])
        for p, u in zip(self.others, updates["others"]):
            p.add_(u)
