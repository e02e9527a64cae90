"""``torch.optim.Optimizer`` over the functional core: ``backends.torch_optim.Shampoo``.

Each parameter keeps its own functional state (as torch optimizers keep per-parameter state),
stored in ``self.state[p]`` as flat tensors (``"leaf0"``, ``"leaf1"``, ...) so that
``state_dict``/``load_state_dict`` work as for any torch optimizer. The learning rate is read
from ``param_group["lr"]`` at every step, so ``torch.optim.lr_scheduler`` schedules apply.
Tensors stay torch tensors on the parameter's device; nothing goes through NumPy.
"""

from __future__ import annotations

import inspect

import array_api_compat.torch as xp
import optree
import torch

import shampoo_core as sc
from shampoo_core.nonfinite import guard

__all__ = ["Shampoo"]

# Schedulers and other tools add their own keys to param groups (e.g. "initial_lr").
_DEFAULTS = {k: v.default for k, v in inspect.signature(sc.shampoo).parameters.items() if k != "learning_rate"}


class Shampoo(torch.optim.Optimizer):
    """Distributed Shampoo as a torch optimizer.

    Args:
        params: iterable of parameters or of param-group dicts (as for any torch optimizer).
        lr: learning rate (>= 0); schedulers may change ``param_group["lr"]``.
        **hyperparameters: any keyword of :func:`shampoo_core.shampoo` except ``learning_rate``;
            per-group values override these defaults.

    Raises:
        ValueError / TypeError: invalid hyperparameters (at construction, naming the argument);
            at ``step``, see :meth:`step`.
    """

    def __init__(self, params, lr: float = 1e-3, **hyperparameters):
        if "learning_rate" in hyperparameters:
            raise TypeError("use lr=..., as torch optimizers do, instead of learning_rate=...")
        sc.shampoo(lr, **hyperparameters)  # validate eagerly, naming the bad argument
        super().__init__(params, dict(lr=lr, **hyperparameters))
        self._transforms: dict = {}
        self._stepped: dict = {}  # id(group) -> the hyperparameters of its last completed step

    def _transform(self, group) -> "_GroupTransform":
        hp = {k: v for k, v in group.items() if k in _DEFAULTS}
        cached = self._transforms.get(id(group))
        # Rebuilt only when a group's hyperparameters change (compared by value: they may be
        # unhashable, e.g. a CostModel); the learning rate is read from the group every step.
        if cached is None or cached.hyperparameters != hp:
            # step() checks the gradients of "raise" groups itself, all at once, before any update.
            checks = hp.get("nonfinite", _DEFAULTS["nonfinite"]) == "raise"
            tx = sc.shampoo(lambda count, group=group: group["lr"], **(dict(hp, nonfinite="ignore") if checks else hp))
            cached = self._transforms[id(group)] = _GroupTransform(hp, tx, {}, self._stepped.get(id(group), hp), checks)
        return cached

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` re-evaluates the model and returns the loss.

        The inputs of every parameter are checked before any parameter is updated, so a step
        rejected for its inputs leaves the parameters and the state as they were.

        Raises:
            ValueError: a sparse gradient; a non-finite gradient in a group with
                ``nonfinite="raise"`` (the default); or a parameter's stored state does not have
                the layout its group's hyperparameters give (``beta1``, ``graft_type``,
                ``block_size`` and others decide which arrays the state holds), e.g. after
                changing one of them mid-run or loading a state dict made with other values.
            TypeError / ValueError: a parameter the core cannot hold state for (complex; float64
                state on a device without float64), named, before any parameter is updated.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, checked = [], []
        for g_index, group in enumerate(self.param_groups):
            gt = self._transform(group)
            for p_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param_groups[{g_index}]['params'][{p_index}]"
                if p.grad.is_sparse:
                    raise ValueError(f"{where}: Shampoo does not support sparse gradients")
                if gt.checks_finite:
                    checked.append((f"the gradient of {where}", p.grad))
                packed = self.state[p]
                if packed:
                    functional = gt.unpack(p, [packed.get(f"leaf{i}") for i in range(len(packed))])
                else:  # a parameter init refuses (complex, float64 where the device has none) updates none
                    try:
                        functional = gt.tx.init(p.detach())
                    except (TypeError, ValueError) as err:
                        raise type(err)(f"{where}: {err}; no parameter was updated") from None
                work.append((gt, p, functional))
        try:  # all parameters at once: one host read (one GPU synchronization) per step
            guard(xp, checked, "raise")
        except ValueError as err:
            raise ValueError(f"{err}; no parameter was updated") from None
        for gt, p, functional in work:
            updates, functional = gt.tx.update(functional, p.grad.detach(), p.detach())
            p.add_(updates)
            packed = self.state[p]
            packed.clear()
            packed.update({f"leaf{i}": t for i, t in enumerate(optree.tree_leaves(functional))})
        for group in self.param_groups:
            self._stepped[id(group)] = self._transforms[id(group)].hyperparameters
        return loss

    def load_state_dict(self, state_dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, except that every state tensor keeps the
        dtype it was saved with (only its device follows the parameter).

        torch casts floating state to the parameter's dtype on load; here that would turn the int32
        counters into floats and round the float32 state of bfloat16 and float16 parameters
        (``state_dtype``). Errors are torch's (group and parameter counts).
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                self.state[p] = {k: v.to(device=p.device) if torch.is_tensor(v) else v for k, v in saved.items()}


class _GroupTransform:
    """A param group's functional optimizer and the state layout it gives each parameter shape."""

    def __init__(self, hyperparameters: dict, tx, layouts: dict, stepped: dict, checks_finite: bool):
        self.hyperparameters = hyperparameters
        self.tx = tx
        self.checks_finite = checks_finite  # step() checks this group's gradients; tx does not
        self._layouts = layouts  # (shape, dtype, device) -> (treespec, leaf shapes)
        self._stepped = stepped  # the hyperparameters of the group's last completed step

    def unpack(self, p, leaves: list):
        """The functional state of ``p`` from its stored leaves, checked against the layout."""
        key = (tuple(p.shape), p.dtype, p.device)
        layout = self._layouts.get(key)
        if layout is None:
            template = self.tx.init(p.detach())
            layout = self._layouts[key] = (
                optree.tree_structure(template), [tuple(t.shape) for t in optree.tree_leaves(template)]
            )
        spec, shapes = layout
        if any(t is None for t in leaves) or [tuple(t.shape) for t in leaves] != shapes:
            before, now = {**_DEFAULTS, **self._stepped}, {**_DEFAULTS, **self.hyperparameters}
            changed = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in now if before[k] != now[k])
            raise ValueError(
                f"the stored optimizer state of a parameter of shape {tuple(p.shape)} ({len(leaves)} "
                f"arrays) does not have the layout its group's hyperparameters give ({len(shapes)} arrays "
                "of fixed shapes; beta1, graft_type, block_size and others decide it)"
                + (f"; changed since the group's last step: {changed}" if changed else "")
                + ". Keep those values, or start a new optimizer for the new ones."
            )
        return optree.tree_unflatten(spec, leaves)
