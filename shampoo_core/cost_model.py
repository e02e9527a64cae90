"""Choosing the inverse-root method per (backend, device, size, dtype) from measured costs.

A cost model maps a backend (the namespace's module name, e.g. ``"array_api_compat.torch"``), a
device kind (``"cpu"``, ``"cuda"``, JAX's ``"gpu"``; see :func:`shampoo_core._xp.device_kind`)
and a root dtype to measured seconds per method at several sizes n, keeping only methods that met
the accuracy requirement when measured (``python -m bench roots --save-cost-model FILE``, and
``python -m bench gpu`` for accelerators). The device is part of the key because the same library
has different crossovers on a CPU and on a GPU, where matmuls are relatively cheaper than
eigensolvers. For a statistic of size n the method of the nearest measured size (in log n) with
the lowest time is chosen. A (backend, device, dtype) without measurements gets ``"eigh"``, which
is backward stable and the fastest method measured on CPUs (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import json
import math

__all__ = ["CostModel", "DEFAULT_METHOD", "FORMAT_VERSION"]

DEFAULT_METHOD = "eigh"
FORMAT_VERSION = 2  # 1 had no device level: timings[backend][dtype]


@dataclasses.dataclass(frozen=True)
class CostModel:
    """``timings[backend][device][dtype]`` is a list of ``[n, {method: seconds}]``, n ascending."""

    timings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_timings(self.timings)

    def table(self, backend: str, device: str, dtype: str) -> list:
        """The measured ``[n, {method: seconds}]`` rows (empty where nothing was measured)."""
        return self.timings.get(backend, {}).get(device, {}).get(dtype, [])

    def choose(self, backend: str, n: int, dtype: str, device: str = "cpu") -> str:
        """The fastest qualifying method at the measured size nearest to ``n`` on ``device``."""
        table = self.table(backend, device, dtype)
        if not table:
            return DEFAULT_METHOD
        _, costs = min(table, key=lambda row: abs(math.log(row[0]) - math.log(max(n, 1))))
        return min(costs, key=costs.get) if costs else DEFAULT_METHOD

    def crossovers(self, backend: str, dtype: str, device: str = "cpu") -> list:
        """``[(n, method)]`` where the chosen method changes, for documentation."""
        out, last = [], None
        for n, _ in self.table(backend, device, dtype):
            method = self.choose(backend, n, dtype, device)
            if method != last:
                out.append((n, method))
                last = method
        return out

    def entries(self) -> list:
        """Every measured ``(backend, device, dtype)``."""
        return [(b, d, t) for b, devices in self.timings.items() for d, dtypes in devices.items() for t in dtypes]

    def merged(self, other: "CostModel") -> "CostModel":
        """This model with ``other``'s tables added (``other`` wins where both measured a key)."""
        timings = json.loads(json.dumps(self.timings))
        for backend, device, dtype in other.entries():
            timings.setdefault(backend, {}).setdefault(device, {})[dtype] = other.table(backend, device, dtype)
        return CostModel(timings)

    def to_dict(self) -> dict:
        """``{"format_version", "timings"}``: plain dicts, lists, strings and numbers (what
        :meth:`save` writes as JSON, and what ``torch.load(weights_only=True)`` accepts)."""
        return {"format_version": FORMAT_VERSION, "timings": json.loads(json.dumps(self.timings))}

    @classmethod
    def from_dict(cls, data, source: str = "the data") -> "CostModel":
        """The model of a :meth:`to_dict` result; ``source`` names it in errors.

        Raises:
            ValueError: not a cost model, or one of another format version (version 1, without
                the device level, must be measured again).
        """
        if not isinstance(data, dict) or "timings" not in data or "format_version" not in data:
            raise ValueError(f"{source} is not a shampoo_core cost model")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"{source} is a cost model of format_version {data['format_version']!r}; this version reads "
                f"{FORMAT_VERSION} (timings per backend, device and dtype): measure it again with "
                f"`python -m bench roots --save-cost-model`"
            )
        return cls(data["timings"])

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path) -> "CostModel":
        """Read a model written by :meth:`save`.

        Raises:
            ValueError: as :meth:`from_dict`, naming ``path``.
        """
        with open(path) as f:
            return cls.from_dict(json.load(f), str(path))


_METHODS = ("eigh", "newton")


def _check_timings(timings) -> None:
    """Raise ValueError naming the first entry of ``timings`` that is not
    ``{backend: {device: {dtype: [[n, {method: seconds}], ...]}}}`` with n ascending."""

    def fail(where: str, what: str):
        raise ValueError(f"CostModel timings{where}: {what}")

    if not isinstance(timings, dict):
        fail("", f"expected a dict {{backend: {{device: {{dtype: rows}}}}}}; got {type(timings).__name__}")
    for backend, devices in timings.items():
        if not isinstance(devices, dict):
            fail(f"[{backend!r}]", f"expected a dict of device kinds; got {type(devices).__name__}")
        for device, dtypes in devices.items():
            if not isinstance(dtypes, dict):
                fail(f"[{backend!r}][{device!r}]", f"expected a dict of dtypes; got {type(dtypes).__name__} "
                     "(format 1 tables had no device level)")
            for dtype, rows in dtypes.items():
                where = f"[{backend!r}][{device!r}][{dtype!r}]"
                if not isinstance(rows, list):
                    fail(where, f"expected a list of [n, {{method: seconds}}]; got {type(rows).__name__}")
                last = 0
                for i, row in enumerate(rows):
                    if not (isinstance(row, (list, tuple)) and len(row) == 2 and isinstance(row[1], dict)):
                        fail(f"{where}[{i}]", f"expected [n, {{method: seconds}}]; got {row!r}")
                    n, costs = row
                    if isinstance(n, bool) or not isinstance(n, int) or n <= last:
                        fail(f"{where}[{i}]", f"sizes must be integers >= 1 in ascending order; got {n!r}")
                    last = n
                    for method, seconds in costs.items():
                        if method not in _METHODS:
                            fail(f"{where}[{i}]", f"unknown method {method!r}; expected one of {_METHODS}")
                        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                                math.isfinite(seconds) and seconds >= 0):
                            fail(f"{where}[{i}]", f"seconds of {method!r} must be finite and >= 0; got {seconds!r}")
