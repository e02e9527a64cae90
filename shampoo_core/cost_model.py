"""Choosing the inverse-root method per (backend, size, dtype) from measured costs.

A cost model maps a backend (the namespace's module name, e.g. ``"array_api_compat.numpy"``) and
a root dtype to measured seconds per method at several sizes n, keeping only methods that met
the accuracy requirement when measured (``python -m bench roots --save-cost-model FILE``). For a
statistic of size n the method of the nearest measured size (in log n) with the lowest time is
chosen. Backends or dtypes without measurements get ``"eigh"``, which is backward stable and the
fastest method measured on CPUs (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import json
import math

__all__ = ["CostModel", "DEFAULT_METHOD"]

DEFAULT_METHOD = "eigh"


@dataclasses.dataclass(frozen=True)
class CostModel:
    """``timings[backend][dtype]`` is a list of ``[n, {method: seconds}]``, n ascending."""

    timings: dict = dataclasses.field(default_factory=dict)

    def choose(self, backend: str, n: int, dtype: str) -> str:
        """The fastest qualifying method at the measured size nearest to ``n``."""
        table = self.timings.get(backend, {}).get(dtype)
        if not table:
            return DEFAULT_METHOD
        _, costs = min(table, key=lambda row: abs(math.log(row[0]) - math.log(max(n, 1))))
        return min(costs, key=costs.get) if costs else DEFAULT_METHOD

    def crossovers(self, backend: str, dtype: str) -> list:
        """``[(n, method)]`` where the chosen method changes, for documentation."""
        out, last = [], None
        for n, _ in self.timings.get(backend, {}).get(dtype, []):
            method = self.choose(backend, n, dtype)
            if method != last:
                out.append((n, method))
                last = method
        return out

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump({"format_version": 1, "timings": self.timings}, f, indent=2)

    @classmethod
    def load(cls, path) -> "CostModel":
        """Read a model written by :meth:`save`.

        Raises:
            ValueError: not a cost model file of a known format version.
        """
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format_version") != 1 or "timings" not in data:
            raise ValueError(f"{path} is not a shampoo_core cost model (format_version 1)")
        return cls(data["timings"])
