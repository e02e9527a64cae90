"""Inverse roots computed in background threads while steps go on (arXiv 2002.09018, Sec. 4-5).

The paper hides root computation by running it on host CPUs while the accelerators keep
stepping with the previous preconditioners. Here a thread pool plays the host CPUs (LAPACK and
BLAS release the GIL): at a root step the block's statistics (the arrays themselves, or a copy
where later steps write into them: ``donate_state``) are handed to a worker and ``update``
keeps using the previous roots. The results are swapped in at a later step boundary, as soon as
they are done, or after at most ``max_staleness`` steps, when the step waits for them.
``deterministic=True`` swaps exactly ``max_staleness`` steps after submission (waiting if
needed), so results do not depend on thread timing. An exception in a worker is raised in the
caller at the step that collects it, before that step writes anything.
"""

from __future__ import annotations

import concurrent.futures
import copy
import threading
import time
from typing import NamedTuple

from . import _xp

__all__ = ["AsyncPreconditioners", "WorkerTimes"]


class WorkerTimes(NamedTuple):
    """What the roots cost an :class:`AsyncPreconditioners`, summed since it was made.

    Attributes:
        jobs: jobs finished (one per block group and root step; failed ones included).
        busy_seconds: wall-clock seconds the workers spent in those jobs.
        waited_seconds: wall-clock seconds callers were blocked in :meth:`AsyncPreconditioners.collect`
            for jobs not yet finished (the staleness bound, or ``deterministic``).

    One worker whose ``busy_seconds`` per root period exceed the period's step time cannot keep
    up: steps then wait at the staleness bound (docs/performance.md, asynchronous preconditioners).
    """

    jobs: int
    busy_seconds: float
    waited_seconds: float


class AsyncPreconditioners:
    """Background executor for Shampoo's inverse roots; pass it as ``async_preconditioners=``.

    Args:
        max_workers: worker threads (>= 1).
        max_staleness: a job submitted at step t is swapped in by step t + max_staleness at the
            latest (the step waits for it). ``None``: ``preconditioning_compute_steps``.
        deterministic: swap exactly at t + max_staleness (reproducible; for tests and resume).
        host: compute on host NumPy copies of the statistics (for device arrays, e.g. CuPy or
            CUDA tensors), copying the roots back; ``False`` computes on the arrays as they are.

    One executor serves one optimizer state: jobs are keyed by leaf and block index, which another
    state would repeat. States that should share the workers take a view each, :meth:`scoped`.
    Not for lazy arrays (JAX): use ``jax.jit`` there.

    Raises:
        ValueError: ``max_workers < 1`` or ``max_staleness < 1``.
    """

    def __init__(self, max_workers: int = 1, max_staleness: int | None = None, deterministic: bool = False,
                 host: bool = False):
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1; got {max_workers}")
        if max_staleness is not None and max_staleness < 1:
            raise ValueError(f"max_staleness must be >= 1; got {max_staleness}")
        self.max_workers = max_workers
        self.max_staleness = max_staleness
        self.deterministic = deterministic
        self.host = host
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="shampoo-roots")
        self._pending: dict = {}
        self._lock = threading.Lock()
        self._scope: tuple = ()
        self._times = [0, 0.0, 0.0]  # jobs, busy, waited: one list, shared by scoped views

    def settings(self) -> dict:
        """The constructor's arguments, as plain values (what a checkpoint can record)."""
        return dict(max_workers=self.max_workers, max_staleness=self.max_staleness,
                    deterministic=self.deterministic, host=self.host)

    def scoped(self, scope) -> "AsyncPreconditioners":
        """A view that shares this executor's workers and settings and keys its jobs under
        ``scope`` (hashable), so that several optimizer states can use one pool: each passes its
        own view as ``async_preconditioners``. ``backends.torch_optim.Shampoo`` keeps one state per
        parameter and gives each a view.

        :meth:`pending`, :meth:`wait`, :meth:`export_pending` and :meth:`import_pending` of a view
        cover its own jobs (of the executor: all of them); :meth:`close` closes the shared pool.
        """
        view = copy.copy(self)
        view._scope = self._scope + (scope,)
        return view

    def _key(self, key) -> tuple:
        return self._scope + tuple(key)

    def _own(self, full_key) -> bool:
        return full_key[:len(self._scope)] == self._scope

    def submit(self, key, step: int, fn, statistics, snapshot: bool = False) -> None:
        """Start ``fn(statistics)`` for ``key`` (a block), unless a job for it is still pending.
        ``snapshot``: the caller will write into ``statistics``, so the worker gets a copy (the host
        copy with ``host=True``, taken here)."""
        key = self._key(key)
        with self._lock:
            if key in self._pending:
                return
            if self.host:
                device = [(_xp.namespace(h), _xp.placement(h, same_shape=True)) for h in statistics]
                host_stats = [_xp.to_numpy(h) for h in statistics]

                def job():
                    return [_back(r, *d) for r, d in zip(fn(host_stats), device)]
            else:
                if snapshot:
                    statistics = [_xp.namespace(h).asarray(h, copy=True) for h in statistics]

                def job():
                    return fn(statistics)

            self._pending[key] = (self._pool.submit(self._timed, job), step)

    def _timed(self, job):
        start = time.perf_counter()
        try:
            return job()
        finally:
            busy = time.perf_counter() - start
            with self._lock:
                self._times[0] += 1
                self._times[1] += busy

    def collect(self, key, step: int, staleness: int):
        """The finished results for ``key`` if due at ``step``, else ``None``.

        Raises:
            RuntimeError: the worker failed; the original exception is chained.
        """
        key = self._key(key)
        with self._lock:
            entry = self._pending.get(key)
        if entry is None:
            return None
        future, submitted = entry
        limit = self.max_staleness or staleness
        age = step - submitted
        if self.deterministic and age < limit:
            return None
        if not (future.done() or age >= limit):
            return None
        with self._lock:
            del self._pending[key]
        if not future.done():
            start = time.perf_counter()
            concurrent.futures.wait([future])
            with self._lock:
                self._times[2] += time.perf_counter() - start
        try:
            return future.result()
        except Exception as err:
            raise RuntimeError(f"inverse root computation for block {key} (submitted at step {submitted}) failed") from err

    def times(self) -> WorkerTimes:
        """The jobs finished and the seconds the workers and callers spent on them so far (all
        views of the pool together)."""
        with self._lock:
            jobs, busy, waited = self._times
        return WorkerTimes(jobs, busy, waited)

    def export_pending(self) -> list:
        """Wait for every job and return ``[(key, submitted_step, results)]`` (they stay queued).

        Used by :func:`shampoo_core.save_state` so that a checkpoint includes roots in flight.

        Raises:
            RuntimeError: a job failed (as :meth:`collect` would).
        """
        self.wait()
        with self._lock:
            items = [(k, v) for k, v in self._pending.items() if self._own(k)]
        out = []
        for key, (future, submitted) in items:
            try:
                out.append((key[len(self._scope):], submitted, future.result()))
            except Exception as err:
                raise RuntimeError(f"inverse root computation for block {key} failed") from err
        return out

    def import_pending(self, entries) -> None:
        """Queue finished ``[(key, submitted_step, results)]`` (from a checkpoint) for collection."""
        with self._lock:
            for key, submitted, results in entries:
                future = concurrent.futures.Future()
                future.set_result(results)
                self._pending[self._key(key)] = (future, submitted)

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(1 for k in self._pending if self._own(k))

    def wait(self) -> None:
        """Block until every submitted job has finished (results stay to be collected)."""
        with self._lock:
            futures = [f for k, (f, _) in self._pending.items() if self._own(k)]
        concurrent.futures.wait(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _back(result, xp, device):
    """A RootResult computed on the host, with its root moved back to ``device`` of ``xp``."""
    return result._replace(root=xp.asarray(result.root, device=device))
