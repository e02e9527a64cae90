"""Inverse roots computed in background threads while steps go on (arXiv 2002.09018, Sec. 4-5).

The paper hides root computation by running it on host CPUs while the accelerators keep
stepping with the previous preconditioners. Here a thread pool plays the host CPUs (LAPACK and
BLAS release the GIL): at a root step the block's statistics (the arrays themselves, or a copy
where later steps write into them: ``donate_state``) are handed to a worker and ``update``
keeps using the previous roots. The results are swapped in at a later step boundary, as soon as
they are done, or after at most ``max_staleness`` steps, when the step waits for them. While it
waits, the step runs due jobs that no worker has started itself (latest submitted first): the
caller's core then shares the backlog instead of idling.
``deterministic=True`` swaps exactly ``max_staleness`` steps after submission (waiting if
needed), so results do not depend on thread timing. An exception in a worker is raised in the
caller at the step that collects it, before that step writes anything.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import itertools
import threading
import time
from typing import NamedTuple

from . import _xp

__all__ = ["AsyncPreconditioners", "WorkerTimes"]


class WorkerTimes(NamedTuple):
    """What the roots cost an :class:`AsyncPreconditioners`, summed since it was made.

    Attributes:
        jobs: jobs finished (one per block, statistic and root step; failed ones included).
        busy_seconds: wall-clock seconds the workers spent in those jobs.
        waited_seconds: wall-clock seconds callers were blocked in :meth:`AsyncPreconditioners.collect`
            for jobs not yet finished (the staleness bound, or ``deterministic``), running due
            jobs themselves included.
        caller_jobs: of ``jobs``, those a caller ran itself because they were due and no worker
            had started them (their time is in ``waited_seconds``, not ``busy_seconds``).

    One worker whose ``busy_seconds`` per root period exceed the period's step time cannot keep
    up: steps then wait at the staleness bound (docs/performance.md, asynchronous preconditioners).
    """

    jobs: int
    busy_seconds: float
    waited_seconds: float
    caller_jobs: int


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
        self._times = [0, 0.0, 0.0, 0]  # jobs, busy, waited, caller jobs: shared by scoped views

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
        """Start ``fn(statistics)`` for ``key`` (a block group), unless a job for it is pending.

        ``statistics``: the group's stacks ``(n, d, d)`` of its ``n`` blocks, one stack per
        dimension; ``fn`` maps a list of such stacks to a list of one
        :class:`~shampoo_core.roots.RootResult` of stacks per stack, each computed on its own
        (``error``, ``lambda_max`` and ``iterations`` as tuples, one number per block). The group
        goes to the workers as one job per block and statistic, so that workers and a waiting
        caller can share even one group; the results are joined when collected. ``snapshot``: the
        caller will write into ``statistics``, so the workers get a copy (the host copy with
        ``host=True``, taken here)."""
        key = self._key(key)
        with self._lock:
            if key in self._pending:
                return
            if self.host:
                device = [(_xp.namespace(h), _xp.placement(h, same_shape=True)) for h in statistics]
                host_stats = [_xp.to_numpy(h) for h in statistics]

                def part(s, b):
                    (result,) = fn([host_stats[s][b:b + 1, ...]])
                    return _back(result, *device[s])
            else:
                if snapshot:
                    statistics = [_xp.namespace(h).asarray(h, copy=True) for h in statistics]

                def part(s, b):
                    (result,) = fn([statistics[s][b:b + 1, ...]])
                    return result

            parts = tuple(functools.partial(part, s, b) for b in range(statistics[0].shape[0])
                          for s in range(len(statistics)))
            futures = tuple(self._pool.submit(self._timed, job) for job in parts)
            self._pending[key] = _Job(futures, step, parts, len(statistics))

    def _timed(self, job):
        start = time.perf_counter()
        try:
            return job()
        finally:
            busy = time.perf_counter() - start
            with self._lock:
                self._times[0] += 1
                self._times[1] += busy

    def _run_unstarted(self, key, step: int, limit: int) -> None:
        """Run in the calling thread, one at a time, this view's jobs due at ``step`` that no worker
        has started (``key``'s own first, then the latest submitted: the workers take the
        earliest), until ``key``'s jobs are done or none is left. Each result, or exception, is
        stored as the finished future of its job, so that collecting it is as for a worker's."""
        while True:
            with self._lock:
                if all(f.done() for f in self._pending[key].futures):
                    return
                order = [key] + [k for k in reversed(self._pending) if k != key and self._own(k)]
                taken = next(((k, i) for k in order if step - self._pending[k].step >= limit
                              for i in reversed(range(len(self._pending[k].futures)))
                              if self._pending[k].futures[i].cancel()), None)
                if taken is None:
                    return
                entry = self._pending[taken[0]]
            future = concurrent.futures.Future()
            try:
                future.set_result(entry.parts[taken[1]]())
            except Exception as err:
                future.set_exception(err)
            with self._lock:
                self._times[0] += 1
                self._times[3] += 1
                futures = list(self._pending[taken[0]].futures)
                futures[taken[1]] = future
                self._pending[taken[0]] = entry._replace(futures=tuple(futures))

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
        limit = self.max_staleness or staleness
        age = step - entry.step
        if self.deterministic and age < limit:
            return None
        done = all(f.done() for f in entry.futures)
        if not (done or age >= limit):
            return None
        if not done:
            start = time.perf_counter()
            self._run_unstarted(key, step, limit)
            with self._lock:
                entry = self._pending[key]
            concurrent.futures.wait(entry.futures)
            with self._lock:
                self._times[2] += time.perf_counter() - start
        with self._lock:
            del self._pending[key]
        try:
            return _joined(entry.futures, entry.stacks)
        except Exception as err:
            raise RuntimeError(f"inverse root computation for block {key} (submitted at step {entry.step}) failed") from err

    def times(self) -> WorkerTimes:
        """The jobs finished and the seconds the workers and callers spent on them so far (all
        views of the pool together)."""
        with self._lock:
            return WorkerTimes(*self._times)

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
        for key, entry in items:
            try:
                out.append((key[len(self._scope):], entry.step, _joined(entry.futures, entry.stacks)))
            except Exception as err:
                raise RuntimeError(f"inverse root computation for block {key} failed") from err
        return out

    def import_pending(self, entries) -> None:
        """Queue finished ``[(key, submitted_step, results)]`` (from a checkpoint) for collection."""
        with self._lock:
            for key, submitted, results in entries:
                future = concurrent.futures.Future()
                future.set_result(results)
                self._pending[self._key(key)] = _Job((future,), submitted, (), 0)

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(1 for k in self._pending if self._own(k))

    def wait(self) -> None:
        """Block until every submitted job has finished (results stay to be collected)."""
        with self._lock:
            futures = [f for k, entry in self._pending.items() if self._own(k) for f in entry.futures]
        concurrent.futures.wait(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Job(NamedTuple):
    """A submitted block group: one future per block and statistic, the step that submitted it,
    the callables the futures run (which a waiting caller may run itself) and the number of
    statistics per block (``()`` and 0 for results imported from a checkpoint, already joined)."""

    futures: tuple
    step: int
    parts: tuple
    stacks: int


def _joined(futures, stacks: int) -> list:
    """The results of a group's jobs (block-major: block 0's ``stacks`` statistics, then block
    1's, ...) as one :class:`~shampoo_core.roots.RootResult` of stacks per statistic: roots
    concatenated along the block axis, per-block numbers in block order.

    Raises:
        Exception: the first failed job's exception.
    """
    results = [f.result() for f in futures]
    if stacks == 0:  # imported from a checkpoint: already joined
        return results[0]
    return [_join_blocks(results[s::stacks]) for s in range(stacks)]


def _join_blocks(rs):
    """One RootResult from per-block ones, in block order: arrays concatenated along axis 0,
    tuples chained, a constant (``iterations`` 0 on lazy arrays) kept."""
    if len(rs) == 1:
        return rs[0]
    xp = _xp.namespace(rs[0].root)

    def join(values):
        if isinstance(values[0], tuple):
            return tuple(itertools.chain.from_iterable(values))
        if isinstance(values[0], (int, float)):
            return values[0]
        return xp.concat(list(values), axis=0)

    return type(rs[0])(*(join(values) for values in zip(*rs)))


def _back(result, xp, device):
    """A RootResult computed on the host, with its root moved back to ``device`` of ``xp``."""
    return result._replace(root=xp.asarray(result.root, device=device))
