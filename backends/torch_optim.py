"""``torch.optim.Optimizer`` over the functional core: ``backends.torch_optim.Shampoo``.

Each parameter keeps its own functional state (as torch optimizers keep per-parameter state),
stored in ``self.state[p]`` as flat tensors (``"leaf0"``, ``"leaf1"``, ...) so that
``state_dict``/``load_state_dict`` work as for any torch optimizer. The parameters of a group
whose step counts agree are updated together, by one call of the core per bounded run of them. The learning rate is read
from ``param_group["lr"]`` at every step, so ``torch.optim.lr_scheduler`` schedules apply.
As in ``torch.optim.Adam``, the two decays are ``betas=(beta1, beta2)`` in each param group, where
the schedulers that cycle momentum (``OneCycleLR``, ``CyclicLR``) find and set them.
Tensors stay torch tensors on the parameter's device; nothing goes through NumPy. As in
``torch.optim``, the state is updated in place (the core's ``donate_state``, on by default here):
a step allocates no second copy of it.
"""

from __future__ import annotations

import inspect

import array_api_compat.torch as xp
import optree
import torch

import shampoo_core as sc
from shampoo_core.nonfinite import guard

__all__ = ["Shampoo"]

_CORE = {k: v.default for k, v in inspect.signature(sc.shampoo).parameters.items() if k != "learning_rate"}
# A group's hyperparameters: the core's keywords, with (beta1, beta2) spelled as torch does, betas,
# and torch's own maximize. Schedulers and other tools add their own keys to param groups
# (e.g. "initial_lr"), ignored here.
_DEFAULTS = {"betas": (_CORE["beta1"], _CORE["beta2"]),
             **{k: v for k, v in _CORE.items() if k not in ("beta1", "beta2")},
             "maximize": False,
             "donate_state": True}  # in place, as torch optimizers update their state
# Values that never change which arrays a parameter's state holds (beta1 does only through beta1 > 0):
# a change of these alone, e.g. OneCycleLR cycling beta1 every step, keeps the cached layouts.
_LAYOUT_FREE = ("betas", "epsilon", "diagonal_epsilon", "weight_decay", "graft_beta2", "inverse_failure_threshold",
                "maximize", "donate_state")


def _fold_betas(group: dict, where: str, default) -> None:
    """Replace the core's spelling ``beta1``/``beta2`` in ``group`` by torch's ``betas`` tuple."""
    given = [k for k in ("beta1", "beta2") if k in group]
    if not given:
        return
    if "betas" in group:
        raise TypeError(f"{where}: give betas=(beta1, beta2) or {' and '.join(given)}, not both")
    beta1, beta2 = default
    group["betas"] = (group.pop("beta1", beta1), group.pop("beta2", beta2))


def _check_betas(betas, where: str) -> tuple:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair (beta1, beta2); got {type(betas).__name__} {betas!r}")
    return tuple(betas)


def _core_hyperparameters(hp: dict) -> dict:
    """A group's hyperparameters as keywords of :func:`shampoo_core.shampoo` (``maximize`` is the
    adapter's: it negates the gradients the core gets)."""
    out = {k: v for k, v in hp.items() if k not in ("betas", "maximize")}
    if "betas" in hp:
        out["beta1"], out["beta2"] = hp["betas"]
    return out


def _check_maximize(hp: dict, where: str) -> None:
    if "maximize" in hp and not isinstance(hp["maximize"], bool):
        value = hp["maximize"]
        raise TypeError(f"{where}maximize must be a bool; got {type(value).__name__} {value!r}")


def _layout_key(hp: dict) -> dict:
    """The hyperparameters that may change which arrays a parameter's state holds."""
    beta1 = hp.get("betas", _DEFAULTS["betas"])[0]
    return {**{k: v for k, v in hp.items() if k not in _LAYOUT_FREE}, "momentum": beta1 > 0.0}


class Shampoo(torch.optim.Optimizer):
    """Distributed Shampoo as a torch optimizer.

    Args:
        params: iterable of parameters or of param-group dicts (as for any torch optimizer).
        lr: learning rate (>= 0); schedulers may change ``param_group["lr"]``.
        betas: ``(beta1, beta2)``, the first-moment and statistics decays of
            :func:`shampoo_core.shampoo` (default ``(0.9, 0.999)``), spelled as in
            ``torch.optim.Adam``; ``OneCycleLR`` and ``CyclicLR`` cycle ``betas[0]``. The core's
            ``beta1=``/``beta2=`` are accepted instead and stored as ``betas``.
        maximize: maximize the objective instead of minimizing it (default ``False``), as in
            ``torch.optim.Adam``: the core gets the negated gradients.
        **hyperparameters: any other keyword of :func:`shampoo_core.shampoo` except
            ``learning_rate``; per-group values override these defaults. ``donate_state``
            defaults to ``True`` here: the state tensors are updated in place, as in
            ``torch.optim``, so a tensor of ``state_dict()`` holds the values of later steps too
            (copy it to keep a snapshot; ``torch.save`` does). ``False`` gives every step new
            tensors.

    Raises:
        ValueError / TypeError: invalid hyperparameters (at construction, naming the argument;
            ``betas`` beside ``beta1``/``beta2``); at ``step``, see :meth:`step`.
    """

    def __init__(self, params, lr: float = 1e-3, betas=None, **hyperparameters):
        if "learning_rate" in hyperparameters:
            raise TypeError("use lr=..., as torch optimizers do, instead of learning_rate=...")
        if betas is not None:
            hyperparameters["betas"] = _check_betas(betas, "")
        _fold_betas(hyperparameters, "Shampoo()", _DEFAULTS["betas"])
        hyperparameters.setdefault("betas", _DEFAULTS["betas"])
        hyperparameters.setdefault("maximize", False)
        hyperparameters.setdefault("donate_state", _DEFAULTS["donate_state"])
        _check_maximize(hyperparameters, "")
        sc.shampoo(lr, **_core_hyperparameters(hyperparameters))  # validate eagerly, naming the bad argument
        self._transforms: dict = {}
        self._stepped: dict = {}  # id(group) -> the hyperparameters of its last completed step
        super().__init__(params, dict(lr=lr, **hyperparameters))

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; a group's ``beta1``/``beta2`` become its
        ``betas``, and its hyperparameters are checked here, naming the group.

        Raises:
            TypeError / ValueError: an invalid hyperparameter, or ``betas`` beside ``beta1``/``beta2``.
        """
        where = f"param_groups[{len(self.param_groups)}]"
        checked = dict(param_group)
        _fold_betas(checked, where, self.defaults["betas"])
        if "betas" in checked:
            checked["betas"] = _check_betas(checked["betas"], f"{where}: ")
        hp = {k: checked[k] if k in checked else self.defaults[k]
              for k in _DEFAULTS if k in checked or k in self.defaults}
        try:
            _check_maximize(hp, "")
            sc.shampoo(checked.get("lr", self.defaults["lr"]), **_core_hyperparameters(hp))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        # Only a valid group is changed, in place: torch keeps the dict it was given as the group.
        param_group.clear()
        param_group.update(checked)
        super().add_param_group(param_group)

    def _transform(self, group) -> "_GroupTransform":
        hp = {k: v for k, v in group.items() if k in _DEFAULTS}
        cached = self._transforms.get(id(group))
        # Rebuilt only when a group's hyperparameters change (compared by value: they may be
        # unhashable, e.g. a CostModel); the learning rate is read from the group every step.
        if cached is None or cached.hyperparameters != hp or "beta1" in group or "beta2" in group:
            where = f"param_groups[{next(i for i, g in enumerate(self.param_groups) if g is group)}]"
            given = [repr(k) for k in ("beta1", "beta2") if k in group]
            if given:  # set on the group after construction, beside its betas
                raise ValueError(f"{where} has {' and '.join(given)}: this optimizer reads group['betas'] = "
                                 "(beta1, beta2), as torch.optim.Adam does; set that instead")
            # A list (from a JSON round trip, say) is as good as a tuple; anything else is named.
            core = _core_hyperparameters(dict(hp, betas=_check_betas(hp["betas"], f"{where}: ")) if "betas" in hp else hp)
            _check_maximize(hp, f"{where}: ")
            # step() checks the gradients of "raise" groups itself, all at once, before any update.
            checks = core.get("nonfinite", _DEFAULTS["nonfinite"]) == "raise"
            core = dict(core, nonfinite="ignore") if checks else core

            def make(**override):
                return sc.shampoo(lambda count, group=group: group["lr"], **{**core, **override})

            same_layout = cached is not None and _layout_key(cached.hyperparameters) == _layout_key(hp)
            layouts = cached._layouts if same_layout else {}
            cached = self._transforms[id(group)] = _GroupTransform(hp, make, layouts, self._stepped.get(id(group), hp), checks,
                                                                   hp.get("maximize", False))
        return cached

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` re-evaluates the model and returns the loss.

        The inputs of every parameter (gradient, stored state layout and dtypes) are checked
        before any parameter is updated, so a step rejected for its inputs leaves the parameters
        and the state as they were. Parameters of a group whose step counts agree (on one device)
        are updated by one call of the core, as a tree, up to a bounded size per call; errors
        name the parameter (``param_groups[i]['params'][j]``).

        Raises:
            ValueError: a sparse gradient; a non-finite gradient in a group with
                ``nonfinite="raise"`` (the default); or a parameter's stored state does not have
                the layout its group's hyperparameters give (``betas[0]`` > 0, ``graft_type``,
                ``block_size`` and others decide which arrays the state holds), e.g. after
                changing one of them mid-run or loading a state dict made with other values.
            TypeError / ValueError: a parameter the core cannot hold state for (complex; float64
                state on a device without float64), or whose stored state has other dtypes than
                those made for it (its dtype changed since).
            RuntimeError: an asynchronous root that failed in its worker (``async_preconditioners``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work, checked = [], []  # work: (group transform, [(p, functional state, where)])
        for g_index, group in enumerate(self.param_groups):
            gt = self._transform(group)
            items = []
            work.append((gt, items))
            for p_index, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = _where(group, g_index, p_index)
                if p.grad.is_sparse:
                    raise ValueError(f"{where}: Shampoo does not support sparse gradients")
                if gt.checks_finite:
                    checked.append((f"the gradient of {where}", p.grad))
                packed = self.state[p]
                if packed:
                    try:
                        functional = gt.unpack(p, [packed.get(f"leaf{i}") for i in range(len(packed))])
                    except ValueError as err:
                        raise ValueError(f"{where}: {err}") from None
                else:  # a parameter init refuses (complex, float64 where the device has none) updates none
                    try:
                        functional = gt.tx.init(p.detach())
                    except (TypeError, ValueError) as err:
                        raise type(err)(f"{where}: {err}; no parameter was updated") from None
                items.append((p, functional, where))
        try:  # all parameters at once: one host read (one GPU synchronization) per step
            guard(xp, checked, "raise")
        except ValueError as err:
            raise ValueError(f"{err}; no parameter was updated") from None
        for gt, items in work:
            for results in gt.calls(items):
                for p, update, functional in results:
                    p.add_(update)
                    packed = self.state[p]
                    packed.clear()
                    packed.update({f"leaf{i}": t for i, t in enumerate(optree.tree_leaves(functional))})
        for group in self.param_groups:
            self._stepped[id(group)] = self._transforms[id(group)].hyperparameters
        return loss

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``, with plain data in the param groups, so that
        ``torch.load`` (``weights_only=True``, its default) reads it back: a ``cost_model`` is
        stored as :meth:`~shampoo_core.CostModel.to_dict`, an ``async_preconditioners`` executor
        as its :meth:`~shampoo_core.AsyncPreconditioners.settings` (a thread pool is not state).

        With asynchronous roots, the roots still in flight are waited for and stored under the
        parameter's ``"pending_roots"`` (as :func:`shampoo_core.save_state` does), so that a
        resumed run swaps them in at the same steps as the uninterrupted one.

        Raises:
            RuntimeError: a root still in flight failed in its worker (naming the parameter).
        """
        out = super().state_dict()
        for group in out["param_groups"]:  # torch's packed copies: the live groups keep their objects
            if isinstance(group.get("cost_model"), sc.CostModel):
                group["cost_model"] = group["cost_model"].to_dict()
            if isinstance(group.get("async_preconditioners"), sc.AsyncPreconditioners):
                group["async_preconditioners"] = group["async_preconditioners"].settings()
        # torch numbers the parameters across groups in order; out["state"] is keyed by that index.
        places = [(g_index, p_index, group, p) for g_index, group in enumerate(self.param_groups)
                  for p_index, p in enumerate(group["params"])]
        for index, (g_index, p_index, group, p) in enumerate(places):
            executor = group.get("async_preconditioners")
            if not isinstance(executor, sc.AsyncPreconditioners) or index not in out["state"]:
                continue
            try:
                pending = _param_view(executor, p).export_pending()
            except RuntimeError as err:
                raise RuntimeError(f"{_where(group, g_index, p_index)}: {err}") from err
            if pending:  # a new dict: torch's packed state shares the live one
                out["state"][index] = {**out["state"][index], "pending_roots": _encode_pending(pending)}
        return out

    def load_state_dict(self, state_dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, except that every state tensor keeps the
        dtype it was saved with (only its device follows the parameter), a saved ``cost_model``
        becomes a :class:`~shampoo_core.CostModel` again, each group keeps the
        ``async_preconditioners`` this optimizer was given (an executor is not state), and saved
        roots in flight are queued on that executor, to be swapped in when they would have been.

        torch casts floating state to the parameter's dtype on load; here that would turn the int32
        counters into floats and round the float32 state of bfloat16 and float16 parameters
        (``state_dtype``). The tensors are copied, as later steps write into them
        (``donate_state``) and ``state_dict`` may still be the caller's. Errors are torch's (group
        and parameter counts), and ValueError for a saved cost model of another format, or saved
        roots in flight for a group of this optimizer without ``async_preconditioners``; the
        optimizer is unchanged after any of them.
        """
        # Read before anything is loaded, so that a bad one leaves the optimizer as it was.
        models = [sc.CostModel.from_dict(g["cost_model"], f"the state dict's param_groups[{i}]['cost_model']")
                  if isinstance(g.get("cost_model"), dict) else None for i, g in enumerate(state_dict["param_groups"])]
        executors = [group.get("async_preconditioners") for group in self.param_groups]
        pending = {}  # saved param id -> its roots in flight
        for i, saved_group in enumerate(state_dict["param_groups"]):
            for j, saved_id in enumerate(saved_group["params"]):
                entries = state_dict["state"].get(saved_id, {}).get("pending_roots")
                if entries is None:
                    continue
                if i < len(executors) and not isinstance(executors[i], sc.AsyncPreconditioners):
                    raise ValueError(
                        f"the state dict's param_groups[{i}]['params'][{j}] has {len(entries)} roots in flight, "
                        f"and param_groups[{i}] of this optimizer has no async_preconditioners to resume them; "
                        "pass one, or delete the state's 'pending_roots' entries to compute them again"
                    )
                pending[saved_id] = entries
        if pending:  # torch's loader would take the entries for state tensors
            state_dict = dict(state_dict, state={k: {n: t for n, t in v.items() if n != "pending_roots"}
                                                 for k, v in state_dict["state"].items()})
        super().load_state_dict(state_dict)
        for i, (group, model, executor) in enumerate(zip(self.param_groups, models, executors)):
            _fold_betas(group, f"param_groups[{i}]", self.defaults["betas"])  # maybe the core's spelling
            group.setdefault("maximize", False)  # a state dict from before the adapter had it
            group.setdefault("donate_state", _DEFAULTS["donate_state"])  # the same
            if model is not None:
                group["cost_model"] = model
            if executor is not None or "async_preconditioners" in group:
                group["async_preconditioners"] = executor
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [(p, group) for group in self.param_groups for p in group["params"]]
        for saved_id, (p, group) in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is not None:  # copies: later steps write into the state (donate_state)
                self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                                 for k, v in saved.items()}
            if saved_id in pending:
                _param_view(group["async_preconditioners"], p).import_pending(_decode_pending(pending[saved_id], p.device))


def _param_view(executor, p):
    """The view of ``executor`` that holds ``p``'s root jobs (see ``_GroupTransform.tx_for``)."""
    return executor.scoped(("param", id(p)))


def _where(group: dict, g_index: int, p_index: int) -> str:
    """How errors name a parameter: its place, and its name when the optimizer was given
    ``named_parameters()``."""
    where = f"param_groups[{g_index}]['params'][{p_index}]"
    if "param_names" in group:
        where += f" ({group['param_names'][p_index]!r})"
    return where


def _encode_pending(entries) -> list:
    """``AsyncPreconditioners.export_pending``'s ``[(key, submitted step, [RootResult])]`` as plain
    data (lists, dicts, numbers, tensors) for ``torch.load(weights_only=True)``."""
    return [{"key": list(key), "step": int(step),
             "results": [dict(r._asdict(), error=[float(e) for e in r.error],
                              lambda_max=[float(v) for v in r.lambda_max],
                              iterations=[int(k) for k in r.iterations]) for r in results]}
            for key, step, results in entries]


def _decode_pending(entries, device) -> list:
    from shampoo_core.roots import RootResult

    return [(tuple(e["key"]), e["step"], [RootResult(**dict(r, root=r["root"].to(device=device))) for r in e["results"]])
            for e in entries]


# Entries of the parameters one core call may update together (see _GroupTransform.calls).
_CALL_NUMEL = 1 << 20


def _chunks(items: list) -> list:
    """``items`` (``(p, functional, where)``) in consecutive runs of at most ``_CALL_NUMEL``
    parameter entries; a larger parameter is a run of its own."""
    out, run, size = [], [], 0
    for item in items:
        n = item[0].numel()
        if run and size + n > _CALL_NUMEL:
            out.append(run)
            run, size = [], 0
        run.append(item)
        size += n
    return out + [run] if run else out


def _update_one(tx, p, grad, functional, where: str) -> tuple:
    """``(p, update, new functional state)`` from one core call on ``p`` alone, with gradient
    ``grad``; its errors are prefixed with ``where`` (RuntimeError: e.g. a failed asynchronous
    root)."""
    try:
        return (p, *tx.update(functional, grad, p.detach()))
    except (TypeError, ValueError, RuntimeError) as err:
        raise type(err)(f"{where}: {err}") from err


class _GroupTransform:
    """A param group's functional optimizer and the state layout it gives each parameter shape."""

    def __init__(self, hyperparameters: dict, make, layouts: dict, stepped: dict, checks_finite: bool,
                 maximize: bool):
        self.hyperparameters = hyperparameters
        self.maximize = maximize
        self.tx = make()
        self.checks_finite = checks_finite  # step() checks this group's gradients; tx does not
        self._make = make
        self._async = hyperparameters.get("async_preconditioners")
        # A call per parameter: each skips on its own gradient, or has its own executor view.
        self._per_parameter = self._async is not None or self.tx.init.hyperparameters["nonfinite"] == "skip"
        self._param_txs: dict = {}  # id(p) -> p's transformation, with asynchronous roots
        self._layouts = layouts  # (shape, dtype, device) -> (treespec, leaf shapes, leaf dtypes)
        self._stepped = stepped  # the hyperparameters of the group's last completed step

    def grad(self, p):
        """The gradient the core gets for ``p``: negated with ``maximize``, as torch.optim.Adam does."""
        g = p.grad.detach()
        return torch.neg(g) if self.maximize else g

    def tx_for(self, p):
        """The transformation that updates ``p``. With asynchronous roots each parameter gets its
        own view of the executor: the core keys root jobs by leaf and block index, which every
        one-parameter state repeats."""
        if self._async is None:
            return self.tx
        tx = self._param_txs.get(id(p))
        if tx is None:  # the optimizer holds p, so its id is not reused while the entry lives
            tx = self._param_txs[id(p)] = self._make(async_preconditioners=_param_view(self._async, p))
        return tx

    def calls(self, items: list):
        """The core calls that update ``items = [(p, functional, where)]``: yields, per call, a list
        of ``(p, update, new functional state)``, to be applied before the next call is made.

        Parameters with equal step counts on one device are updated together, as the core updates
        a tree: one count read (a GPU synchronization) and one schedule per call instead of one
        per parameter. Without ``donate_state`` a call holds the old and the new state of its
        parameters at once, so it takes parameters only up to ``_CALL_NUMEL`` entries (a larger
        one is a call of its own): the optimizer's peak memory stays the state plus that much, as
        when each parameter was a call. With ``nonfinite="skip"`` (each parameter skips on its own
        gradient) or asynchronous roots (each parameter has its own executor view) every parameter
        is a call.
        """
        if self._per_parameter:
            for p, f, where in items:
                yield [_update_one(self.tx_for(p), p, self.grad(p), f, where)]
            return
        cohorts: dict = {}
        for device in {p.device: None for p, _, _ in items}:
            on_device = [item for item in items if item[0].device == device]
            counts = torch.stack([f.count for _, f, _ in on_device]).tolist()  # one host read
            for count, item in zip(counts, on_device):
                cohorts.setdefault((device, count), []).append(item)
        for cohort in cohorts.values():
            for call in _chunks(cohort):
                yield self._joint_update(call)

    def _joint_update(self, call: list) -> list:
        grads = [self.grad(p) for p, _, _ in call]
        if len(call) == 1:
            p, f, where = call[0]
            return [_update_one(self.tx, p, grads[0], f, where)]
        state = call[0][1]._replace(params=tuple(f.params[0] for _, f, _ in call))
        try:
            updates, new = self.tx.update(state, grads, [p.detach() for p, _, _ in call])
        except (TypeError, ValueError, RuntimeError):
            # The core names a list index; name the parameter. Each is run again without donation,
            # so that the parameters whose inputs pass keep their state as it was.
            checking = self._make(donate_state=False)
            for (p, f, where), g in zip(call, grads):
                _update_one(checking, p, g, f, where)
            raise
        # Each parameter keeps a count tensor of its own, as torch optimizers keep "step".
        return [(p, u, f._replace(count=new.count if i == 0 else new.count.clone(), params=(new.params[i],)))
                for i, ((p, f, _), u) in enumerate(zip(call, updates))]

    def unpack(self, p, leaves: list):
        """The functional state of ``p`` from its stored leaves, checked against the layout."""
        key = (tuple(p.shape), p.dtype, p.device)
        layout = self._layouts.get(key)
        if layout is None:
            template = self.tx.init(p.detach())
            arrays = optree.tree_leaves(template)
            layout = self._layouts[key] = (
                optree.tree_structure(template), [tuple(t.shape) for t in arrays], [t.dtype for t in arrays]
            )
        spec, shapes, dtypes = layout
        if any(t is None for t in leaves) or [tuple(t.shape) for t in leaves] != shapes:
            before, now = {**_DEFAULTS, **self._stepped}, {**_DEFAULTS, **self.hyperparameters}
            changed = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in now if before[k] != now[k])
            raise ValueError(
                f"the stored optimizer state of a parameter of shape {tuple(p.shape)} ({len(leaves)} "
                f"arrays) does not have the layout its group's hyperparameters give ({len(shapes)} arrays "
                "of fixed shapes; beta1 > 0 (betas[0]), graft_type, block_size and others decide it)"
                + (f"; changed since the group's last step: {changed}" if changed else "")
                + ". Keep those values, or start a new optimizer for the new ones."
            )
        stored = [t.dtype for t in leaves]
        if stored != dtypes:
            got, want = next((a, b) for a, b in zip(stored, dtypes) if a != b)
            raise ValueError(
                f"the stored optimizer state of a parameter of dtype {p.dtype} holds {got} arrays where "
                f"{want} ones are made for it (did the parameter's dtype change since its state was made?)"
            )
        return optree.tree_unflatten(spec, leaves)
