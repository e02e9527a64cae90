"""The one timer of every bench command: wall-clock seconds per call after warm-up calls, and
the threads and CPUs a timed run may use."""

from __future__ import annotations

import contextlib
import os
import time


def call_times(fn, n: int, *, warmup: int = 1, sync=None, budget: float | None = None):
    """``(seconds per call, last output)`` of ``n`` timed calls of ``fn()``.

    ``warmup`` untimed calls come first (JIT compilation, first-touch allocation). ``sync()``, if
    given, waits for a device's queued work after the warm-up and inside every timed call, so that
    asynchronous launches are not mistaken for finished work. With ``budget`` (seconds), timing
    stops early once that much time has passed and at least two calls were timed.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    if sync is not None:
        sync()
    times = []
    t_end = None if budget is None else time.perf_counter() + budget
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        if t_end is not None and time.perf_counter() > t_end and len(times) >= 2:
            break
    return times, out


def limit_threads(n: int) -> dict:
    """Limit the BLAS and OpenMP pools to ``n`` threads (environment for pools not yet started,
    threadpoolctl for those running) with passive waiting; returns what was set, for the report.

    Spinning OpenMP workers made a 1024x1024 eigh 30x slower on this machine.
    """
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    info = {"threads": n}
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
        info["threadpoolctl"] = True
    except ImportError:
        info["threadpoolctl"] = False
    return info


def blas_libraries() -> list:
    """The BLAS libraries loaded in this process, as threadpoolctl reports them: per library its
    ``internal_api`` (openblas, mkl, ...), ``version``, ``architecture`` (the kernels it runs:
    OpenBLAS picks them per processor, or as ``OPENBLAS_CORETYPE`` says) and ``num_threads``.
    A floor is only as fast as these kernels, so a report names them. ``[]`` without
    threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("internal_api", "version", "architecture", "num_threads")
    return [{k: info.get(k) for k in keys} for info in threadpool_info() if info.get("user_api") == "blas"]


def xla_flags(threads: int) -> str:
    """The ``XLA_FLAGS`` the bench commands start JAX's CPU client with, unless ``XLA_FLAGS`` is
    set (then it is used as it is): with ``threads == 1``, XLA's Eigen kernels (its dot and
    convolution) on the calling thread instead of a pool of one thread per core.

    Set ``XLA_FLAGS`` to time other settings, such as
    ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (``docs/performance.md``).
    """
    return "--xla_cpu_multi_thread_eigen=false" if threads == 1 else ""


def start_jax(threads: int, report: dict | None = None):
    """Import JAX and start its CPU client with :func:`xla_flags` (or the environment's
    ``XLA_FLAGS``); returns the ``jax`` module. With ``report``, its ``"xla_flags"`` says which,
    or is None where the client already ran (in a test session, say): it keeps the settings it
    was started with.
    """
    import jax

    if _jax_started():
        flags = None
    elif "XLA_FLAGS" in os.environ:
        flags = os.environ["XLA_FLAGS"]
    else:
        flags = xla_flags(threads)
        # Read once, when JAX starts its CPU client; not left in the environment, where child
        # processes would inherit it. XLA stops parsing at a token that is not a --flag, so only
        # real flags go here.
        os.environ["XLA_FLAGS"] = flags
        try:
            jax.devices()
        finally:
            del os.environ["XLA_FLAGS"]
    if report is not None:
        report["xla_flags"] = flags
    return jax


def _jax_started() -> bool:
    try:  # JAX has no public test for it; without one, assume a fresh client
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
        return False
    return backends_are_initialized()


@contextlib.contextmanager
def pinned(n: int):
    """:func:`limit_threads` and :func:`pinned_cpus` together: yields the report's thread info,
    the CPUs under ``"cpus"``. For a timed run whose every thread should share ``n`` CPUs (not
    for one whose worker needs a core of its own)."""
    info = limit_threads(n)
    with pinned_cpus(n) as cpus:
        info["cpus"] = cpus
        yield info


@contextlib.contextmanager
def pinned_cpus(n: int):
    """Run the block with every thread of this process on the first ``n`` CPUs it may use, and
    give each thread back the CPUs it had (or, if it started inside the block, the process's)
    after it. Yields the CPUs, or None where the system cannot pin (not Linux).

    Pinning the library's thread counts is not enough for XLA: its CPU runtime runs independent
    operations of one compiled call side by side on a pool of its own, one thread per core, so
    that a jitted floor of many small matmuls used both cores of a two-core machine while the
    step's few batched ones used about one. Threads that already run (a JAX client started
    before) are pinned too: Linux sets the CPUs of one thread at a time.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    allowed = sorted(os.sched_getaffinity(0))
    cpus = set(allowed[:max(n, 1)])
    saved = {}
    for tid in _threads():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
    try:
        yield sorted(cpus)
    finally:
        for tid in _threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, saved.get(tid, set(allowed)))


def _threads() -> list:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # the calling thread alone
