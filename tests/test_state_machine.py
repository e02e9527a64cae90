"""A hypothesis state machine drives init/update/save/load/skip in random orders.

Invariants after every rule: updates are finite; the state keeps its structure, shapes and
dtypes; ``count`` equals the finite steps taken and ``skipped`` the non-finite ones; a loaded
checkpoint equals the state that was saved; and the optimizer's trajectory equals a shadow run
that never saw the skipped steps or the save/load round trips.
"""

import shutil
import tempfile

import numpy as np
import optree
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shampoo_core as sc

SHAPES = {"w": (6, 4), "t": (2, 3, 2), "b": (4,), "s": ()}


def make_tx(hp):
    return sc.shampoo(0.05, nonfinite="skip", **hp)


class OptimizerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.folder = tempfile.mkdtemp()
        self.saved = None

    def teardown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    @initialize(
        hp=st.fixed_dictionaries(dict(
            block_size=st.integers(2, 5),
            graft_type=st.sampled_from(["adagrad", "adam", "sgd", "rmsprop"]),
            root_method=st.sampled_from(["eigh", "newton"]),
            start_preconditioning_step=st.integers(1, 3),
            preconditioning_compute_steps=st.integers(1, 3),
            beta2=st.sampled_from([0.9, 0.99]),
        )),
        dtype=st.sampled_from(["float32", "float64"]),
        seed=st.integers(0, 2**16),
    )
    def init(self, hp, dtype, seed):
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.tx = make_tx(hp)
        self.params = {k: self.rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
        self.state = self.tx.init(self.params)
        self.shadow_params = dict(self.params)
        self.shadow_state = self.tx.init(self.params)
        self.spec = optree.tree_structure(self.state)
        self.meta = [(np.shape(x), np.asarray(x).dtype) for x in optree.tree_leaves(self.state)]
        self.steps = 0
        self.skips = 0
        self.last_updates = None

    def grads(self):
        return {k: self.rng.standard_normal(s).astype(self.dtype) * 10 ** self.rng.uniform(-3, 2)
                for k, s in SHAPES.items()}

    @rule()
    def finite_step(self):
        g = self.grads()
        updates, self.state = self.tx.update(self.state, g, self.params)
        self.params = sc.apply_updates(self.params, updates)
        shadow_updates, self.shadow_state = self.tx.update(self.shadow_state, g, self.shadow_params)
        self.shadow_params = sc.apply_updates(self.shadow_params, shadow_updates)
        self.last_updates = updates
        self.steps += 1

    @rule(value=st.sampled_from([np.nan, np.inf, -np.inf]), key=st.sampled_from(sorted(SHAPES)))
    def nonfinite_step(self, value, key):
        g = self.grads()
        g[key] = np.full_like(g[key], value)
        updates, self.state = self.tx.update(self.state, g, self.params)
        for u in updates.values():
            assert not np.any(u)
        self.skips += 1

    @rule()
    def save(self):
        path = f"{self.folder}/ckpt.npz"
        sc.save_state(path, self.state, tx=self.tx)
        self.saved = (path, optree.tree_map(np.copy, self.state), self.skips)

    @precondition(lambda self: self.saved is not None)
    @rule()
    def load(self):
        path, expected, self.skips = self.saved
        loaded = sc.load_state(path, like=self.params, tx=self.tx)
        for a, b in zip(optree.tree_leaves(loaded), optree.tree_leaves(expected)):
            np.testing.assert_array_equal(a, b)
        self.state = loaded
        self.saved = None
        # Parameters are not part of the optimizer state: both runs continue from the current
        # parameters with the checkpointed state.
        self.shadow_state = optree.tree_map(np.copy, loaded)
        self.shadow_params = dict(self.params)

    @invariant()
    def structure_and_counters(self):
        if not hasattr(self, "state"):
            return
        assert optree.tree_structure(self.state) == self.spec
        assert [(np.shape(x), np.asarray(x).dtype) for x in optree.tree_leaves(self.state)] == self.meta
        assert int(self.state.skipped) == self.skips
        if self.last_updates is not None:
            assert all(np.all(np.isfinite(u)) for u in self.last_updates.values())

    @invariant()
    def matches_shadow(self):
        if not hasattr(self, "state"):
            return
        for k in SHAPES:
            np.testing.assert_array_equal(self.params[k], self.shadow_params[k])
        live = optree.tree_leaves(self.state._replace(skipped=None))
        shadow = optree.tree_leaves(self.shadow_state._replace(skipped=None))
        for a, b in zip(live, shadow):
            np.testing.assert_array_equal(a, b)


OptimizerMachine.TestCase.settings = settings(
    settings.get_profile(settings._current_profile), max_examples=25, stateful_step_count=12
)
TestOptimizerMachine = OptimizerMachine.TestCase
