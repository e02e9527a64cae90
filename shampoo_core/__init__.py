"""shampoo-core: Distributed Shampoo (arXiv 2002.09018) on the Python array API.

Functional API::

    tx = shampoo_core.shampoo(learning_rate=1e-3, block_size=128)
    state = tx.init(params)
    updates, state = tx.update(state, grads, params)
    params = shampoo_core.apply_updates(params, updates)
"""

from .async_roots import AsyncPreconditioners, WorkerTimes
from .base import GradientTransformation, apply_updates
from .checkpoint import CheckpointError, load_state, read_header, save_state
from .cost_model import CostModel
from .eva import EvaState, eva, eva_s
from .kfac import KFACState, kfac
from .first_order import FirstOrderState, adagrad, adam, sgd
from .full_matrix import FullMatrixState, full_matrix_adagrad
from .options import GraftGranularity, GraftType, RootMethod
from .roots import RootResult, inverse_pth_root
from .shampoo import BlockState, ParamState, ShampooConfig, ShampooState, shampoo

__version__ = "0.1.0"

__all__ = [
    "GradientTransformation",
    "apply_updates",
    "save_state",
    "load_state",
    "read_header",
    "CheckpointError",
    "shampoo",
    "ShampooConfig",
    "ShampooState",
    "ParamState",
    "BlockState",
    "sgd",
    "adagrad",
    "adam",
    "FirstOrderState",
    "full_matrix_adagrad",
    "FullMatrixState",
    "inverse_pth_root",
    "RootResult",
    "GraftType",
    "GraftGranularity",
    "RootMethod",
    "CostModel",
    "AsyncPreconditioners",
    "WorkerTimes",
    "eva",
    "eva_s",
    "EvaState",
    "kfac",
    "KFACState",
]
