"""``torch.optim.Optimizer`` over the functional core: ``backends.torch_optim.Shampoo``.

Each parameter keeps its own functional state (as torch optimizers keep per-parameter state),
stored in ``self.state[p]`` as flat tensors (``"leaf0"``, ``"leaf1"``, ...) so that
``state_dict``/``load_state_dict`` work as for any torch optimizer. The learning rate is read
from ``param_group["lr"]`` at every step, so ``torch.optim.lr_scheduler`` schedules apply.
Tensors stay torch tensors on the parameter's device; nothing goes through NumPy.
"""

from __future__ import annotations

import inspect

import optree
import torch

import shampoo_core as sc

__all__ = ["Shampoo"]

# Schedulers and other tools add their own keys to param groups (e.g. "initial_lr").
_SHAMPOO_ARGS = frozenset(inspect.signature(sc.shampoo).parameters) - {"learning_rate"}


class Shampoo(torch.optim.Optimizer):
    """Distributed Shampoo as a torch optimizer.

    Args:
        params: iterable of parameters or of param-group dicts (as for any torch optimizer).
        lr: learning rate (>= 0); schedulers may change ``param_group["lr"]``.
        **hyperparameters: any keyword of :func:`shampoo_core.shampoo` except ``learning_rate``;
            per-group values override these defaults.

    Raises:
        ValueError / TypeError: invalid hyperparameters (at construction, naming the argument);
            sparse gradients (at ``step``).
    """

    def __init__(self, params, lr: float = 1e-3, **hyperparameters):
        if "learning_rate" in hyperparameters:
            raise TypeError("use lr=..., as torch optimizers do, instead of learning_rate=...")
        sc.shampoo(lr, **hyperparameters)  # validate eagerly, naming the bad argument
        super().__init__(params, dict(lr=lr, **hyperparameters))
        self._transforms: dict = {}
        self._structures: dict = {}

    def _transform(self, group):
        hp = {k: v for k, v in group.items() if k in _SHAMPOO_ARGS}
        cached = self._transforms.get(id(group))
        # Rebuilt only when a group's hyperparameters change (compared by value: they may be
        # unhashable, e.g. a CostModel); the learning rate is read from the group every step.
        if cached is None or cached[0] != hp:
            cached = (hp, sc.shampoo(lambda count, group=group: group["lr"], **hp))
            self._transforms[id(group)] = cached
        return cached[1]

    def _structure(self, tx, p):
        key = (id(tx), tuple(p.shape), p.dtype, p.device)
        spec = self._structures.get(key)
        if spec is None:
            spec = self._structures[key] = optree.tree_structure(tx.init(p.detach()))
        return spec

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tx = self._transform(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("Shampoo does not support sparse gradients")
                packed = self.state[p]
                if packed:
                    leaves = [packed[f"leaf{i}"] for i in range(len(packed))]
                    functional = optree.tree_unflatten(self._structure(tx, p), leaves)
                else:
                    functional = tx.init(p.detach())
                updates, functional = tx.update(functional, p.grad.detach(), p.detach())
                p.add_(updates)
                packed.clear()
                packed.update({f"leaf{i}": t for i, t in enumerate(optree.tree_leaves(functional))})
        return loss
