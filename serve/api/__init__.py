"""The service's routes, one router per resource; :mod:`.deps` holds what they share (the
service, the API key check for HTTP and WebSocket, the documented errors)."""

from __future__ import annotations

from . import fmri_jobs, meg, models, ops

#: in the order of the OpenAPI document
ROUTERS = (ops.router, models.router, fmri_jobs.router, meg.router, fmri_jobs.page, meg.page)
