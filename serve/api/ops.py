"""Operations: liveness, readiness and Prometheus metrics (no key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..schemas import Health, Ready
from .deps import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health, summary="liveness (no key)")
def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Ready, summary="bundles loaded and a job worker alive",
            responses={503: {"model": Ready}})
def ready(svc: ServiceDep) -> Any:
    alive = svc.store.workers_alive(within_s=5.0)
    body = Ready(ready=bool(svc.decoders) and alive > 0, models=sorted(svc.decoders),
                 workers_alive=alive, queued=svc.store.counts()["queued"])
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(svc: ServiceDep) -> Response:
    body, content_type = svc.metrics.render()
    return Response(body, media_type=content_type)
