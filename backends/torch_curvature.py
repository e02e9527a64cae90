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
``state_dict()`` / ``load_state_dict()`` save and restore the optimizer state (tensors, for
``torch.save``), checked against the layout the transformation gives this model.

The trees handed to ``tx`` are ``{"layers": {module name: [W | b]}, "others": {parameter name:
p}}`` with the names of ``model.named_modules()`` / ``named_parameters()`` (the model itself, when
it is one layer, is ``"model"``), so an error such as a non-finite input names the layer:
``grads['layers']['encoder.0'] has non-finite values``.

Under ``torch.autocast`` the recorded inputs and output gradients are in the autocast dtype
(e.g. bfloat16) while weights and their gradients stay float32: the curvature is computed in the
weight's dtype, from the recorded rows cast to it.
"""

from __future__ import annotations

import array_api_compat.torch as xp
import optree
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
        named = [(name or "model", m) for name, m in model.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        self.layer_names = [name for name, _ in named]
        self.layers = [m for _, m in named]
        layer_params = {id(p) for m in self.layers for p in m.parameters(recurse=False)}
        others = [(name, p) for name, p in model.named_parameters() if id(p) not in layer_params]
        self.other_names = [name for name, _ in others]
        self.others = [p for _, p in others]
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
            return self._tree([self._matrix(m.weight, m.bias) for m in self.layers],
                              [p.detach() for p in self.others])

    def _tree(self, layers, others):
        return {"layers": dict(zip(self.layer_names, layers)), "others": dict(zip(self.other_names, others))}

    def _samples(self, i, m):
        """(input rows, output-gradient rows), one row per sample (conv: per position), in the
        weight's dtype (autocast records them in its own)."""
        a, g = self._inputs[i].to(m.weight.dtype), self._grads[i].to(m.weight.dtype)
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
        return self._tree(out, [None] * len(self.others))

    def state_dict(self) -> dict:
        """``{"kind": ..., "leaves": [tensor, ...]}``: copies of the state's arrays in a fixed order
        (that of ``optree.tree_leaves(self.state)``)."""
        return {"kind": self.kind, "leaves": [t.detach().clone() for t in optree.tree_leaves(self.state)]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state made by :meth:`state_dict` of an optimizer with the same transformation,
        ``kind`` and model shapes; tensors move to the device of this optimizer's state.

        Raises:
            ValueError: another ``kind``, another number of arrays (e.g. a K-FAC state loaded into
                Eva, or another model), or an array of another shape or dtype, named by its index;
                the current state is then left as it was.
        """
        if state_dict.get("kind", self.kind) != self.kind:
            raise ValueError(f"state_dict was made with kind={state_dict['kind']!r}; this optimizer has "
                             f"kind={self.kind!r}")
        template, spec = optree.tree_flatten(self.tx.init(self._params()))
        leaves = list(state_dict.get("leaves", ()))
        if len(leaves) != len(template):
            raise ValueError(f"state_dict holds {len(leaves)} arrays; this optimizer's state has {len(template)} "
                             "(another transformation, variant or model?)")
        for i, (got, want) in enumerate(zip(leaves, template)):
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise ValueError(f"state_dict['leaves'][{i}] has shape {tuple(got.shape)} and dtype {got.dtype}; "
                                 f"the state expects {tuple(want.shape)} and {want.dtype}")
        self.state = optree.tree_unflatten(spec, [got.detach().to(want.device).clone()
                                                  for got, want in zip(leaves, template)])

    @torch.no_grad()
    def step(self) -> None:
        params = self._params()
        grads = self._tree([self._matrix(m.weight.grad, m.bias.grad if m.bias is not None else None)
                            for m in self.layers], [p.grad for p in self.others])
        if self.kind is None:
            updates, self.state = self.tx.update(self.state, grads, params)
        else:
            updates, self.state = self.tx.update(self.state, grads, params, curvature=self._curvature())
        for name, m in zip(self.layer_names, self.layers):
            u = updates["layers"][name]
            m.weight.add_(u[:, :-1].reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.add_(u[:, -1])
        for name, p in zip(self.other_names, self.others):
            p.add_(updates["others"][name])
