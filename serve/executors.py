"""Where a job's stages run: in the worker process (``local``) or on Ray actors (``ray``).

Both run the same functions of :mod:`.jobs`. On Ray each actor loads the bundles once and
keeps them (Decoder + generator); image batches go to the actors in parallel and come back as
they finish.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from neurorecon.models.common.logging import logger
from neurorecon.pipelines.common.parallel import init_ray
from neurorecon.pipelines.inference import Decoder

from . import jobs
from .schemas import JobSpec


class LocalExecutor:
    """Stages in this process, one after the other."""

    def __init__(self, decoders: dict[str, Decoder]):
        self.decoders = decoders

    def decode(self, model: str, job_dir: Path, spec: JobSpec) -> dict[str, np.ndarray]:
        return jobs.decode_inputs(self.decoders[model], job_dir, spec)

    def generate(self, model: str, spec: JobSpec, batches: list[dict[str, Any]]
                 ) -> Iterator[tuple[int, list[bytes]]]:
        for b, batch in enumerate(batches):
            yield b, jobs.generate_batch(self.decoders[model], subject=spec.subject,
                                         gen=batch["gen"], clip=batch["clip"], X=batch["X"],
                                         options=spec.options, seed=batch["seed"])

    def close(self) -> None:
        pass


class _Actor:
    """A Ray actor holding every served bundle (loaded once, when the actor starts)."""

    def __init__(self, bundles: list[str], threads: int):
        import torch

        from .bundles import load_bundles

        torch.set_num_threads(threads)
        self.decoders = load_bundles(bundles, generators=True)

    def decode(self, model: str, job_dir: str, spec: JobSpec):
        return jobs.decode_inputs(self.decoders[model], Path(job_dir), spec)

    def generate(self, model: str, spec: JobSpec, batch: dict[str, Any]) -> list[bytes]:
        return jobs.generate_batch(self.decoders[model], subject=spec.subject,
                                   gen=batch["gen"], clip=batch["clip"], X=batch["X"],
                                   options=spec.options, seed=batch["seed"])


class RayExecutor:
    """Stages on ``workers`` Ray actors; a local Ray bound to 127.0.0.1 unless ``address``."""

    def __init__(self, bundles: list[str], *, workers: int, address: str | None = None):
        import ray

        init_ray(address, num_cpus=workers)
        threads = max(1, (os.cpu_count() or 1) // workers)
        actor = ray.remote(num_cpus=1)(_Actor)
        self.actors = [actor.remote([str(b) for b in bundles], threads)
                       for _ in range(workers)]
        ray.get([a.__ray_ready__.remote() for a in self.actors])
        logger.info("serve: %d Ray actor(s) ready (%d torch thread(s) each)", workers, threads)
        self._ray = ray

    def decode(self, model: str, job_dir: Path, spec: JobSpec) -> dict[str, np.ndarray]:
        return self._ray.get(self.actors[0].decode.remote(model, str(job_dir), spec))

    def generate(self, model: str, spec: JobSpec, batches: list[dict[str, Any]]
                 ) -> Iterator[tuple[int, list[bytes]]]:
        ray = self._ray
        pending = {self.actors[b % len(self.actors)].generate.remote(model, spec, batch): b
                   for b, batch in enumerate(batches)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    yield pending.pop(ref), ray.get(ref)
        finally:
            for ref in pending:  # cancelled job: drop what has not started
                ray.cancel(ref)

    def close(self) -> None:
        self._ray.shutdown()
