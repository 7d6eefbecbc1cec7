"""Independent tasks (one per recording) in this process, in joblib workers or on Ray.

``preprocess.n_jobs`` workers run the same top-level function on every item: ``joblib``
(loky processes on this machine; ``n_jobs=-1``: one per core) or ``ray`` (tasks on an
existing cluster given by ``preprocess.ray_address``, else a local Ray bound to 127.0.0.1).
Results come back in the order of the items. Tasks return small metadata and write their
arrays to files, so nothing large travels back through the pipe.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from neurorecon.models.common.checks import check_option
from neurorecon.models.common.logging import logger, progress

T = TypeVar("T")
EXECUTORS = ("joblib", "ray")


def n_workers(n_jobs: int, n_items: int) -> int:
    """Workers worth starting: ``n_jobs`` (``-1``: every core), at most one per item."""
    n = (os.cpu_count() or 1) if n_jobs in (-1, None) else int(n_jobs)
    if n < 1:
        raise ValueError(f"n_jobs must be a positive number of workers or -1, got {n_jobs}")
    return max(1, min(n, n_items))


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one on 127.0.0.1 (no
    dashboard) with ``num_cpus`` CPUs; nothing if Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")


def map_tasks(fn: Callable[..., T], items: Sequence[Mapping[str, Any]], *, n_jobs: int = 1,
              executor: str = "joblib", address: str | None = None, desc: str = "tasks"
              ) -> list[T]:
    """``[fn(**item) for item in items]`` on ``n_jobs`` workers of ``executor``, in order.

    With one worker (and no Ray) the calls run in this process. ``fn`` must be importable
    (a module-level function), and its items and result picklable.
    """
    check_option("preprocess.executor", executor, EXECUTORS)
    workers = n_workers(n_jobs, len(items))
    if executor == "joblib" and workers == 1:
        return [fn(**item) for item in progress(items, desc=desc, total=len(items))]
    logger.info("%s: %d task(s) on %d %s worker(s)", desc, len(items), workers, executor)
    if executor == "joblib":
        from joblib import Parallel, delayed

        run = Parallel(n_jobs=workers, return_as="generator")(delayed(fn)(**it) for it in items)
        return list(progress(run, desc=desc, total=len(items)))
    import ray

    init_ray(address, num_cpus=None if address else workers)
    task = ray.remote(num_cpus=1)(fn)
    refs = [task.remote(**item) for item in items]
    pending = list(refs)
    for _ in progress(range(len(refs)), desc=desc, total=len(refs)):
        _, pending = ray.wait(pending, num_returns=1)
    return ray.get(refs)
