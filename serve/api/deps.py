"""What every router shares: the service, the API key (one owner check, rate limited, for HTTP
routes, pages and the WebSocket) and the documented error answers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security, WebSocket
from fastapi.security import APIKeyHeader, APIKeyQuery

from ..schemas import Problem
from ..service import Service

#: the documented error answers: every 4xx body is a ``Problem`` (``{"detail": "<text>"}``),
#: validation errors included (``loc: msg; ...``, not FastAPI's list form)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "malformed request body (multipart or JSON)"},
    401: {"model": Problem, "description": "missing or unknown API key",
          "headers": {"WWW-Authenticate": {"description": "names the header: X-API-Key",
                                           "schema": {"type": "string"}}}},
    404: {"model": Problem, "description": "no such job for this key"},
    409: {"model": Problem, "description": "the job has not succeeded (yet)"},
    413: {"model": Problem, "description": "request body over serve.max_upload_mb"},
    422: {"model": Problem, "description": "invalid input (the message names it)"},
    429: {"model": Problem, "description": "too many requests for this key",
          "headers": {"Retry-After": {"description": "seconds to wait",
                                      "schema": {"type": "integer"}}}},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry documenting these error codes."""
    return {code: ERRORS[code] for code in codes}


def page_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The same for an HTML page: its errors are JSON all the same (FastAPI would file a
    ``model`` under the page's ``text/html``)."""
    problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {code: {**{k: v for k, v in ERRORS[code].items() if k != "model"},
                   "content": problem} for code in codes}


#: the API key: the ``X-API-Key`` header (pages and thumbnails also take ``?key=``, since
#: browsers cannot set headers); checked by :func:`owner_of`, which answers 401 itself
API_KEY = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                       description="API key (`neurorecon key key.name=...` makes one)")
API_KEY_QUERY = APIKeyQuery(name="key", scheme_name="ApiKeyQuery", auto_error=False,
                            description="the API key as ?key= (pages and gallery thumbnails)")


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


def owner_of(svc: Service, key: str | None) -> str:
    """The key's owner; 401 for a missing or unknown key, 429 over the key's rate limit."""
    owner = svc.keys.identify(key)
    if owner is None:
        raise HTTPException(401, "missing or unknown API key: send it in the X-API-Key header",
                            headers={"WWW-Authenticate": "X-API-Key"})
    wait = svc.allow(owner)
    if wait is not None:
        raise HTTPException(429, f"rate limit of {svc.settings.rate_limit_per_minute} requests "
                                 "per minute reached for this key",
                            headers={"Retry-After": str(int(wait) + 1)})
    return owner


def api_owner(svc: ServiceDep,
              x_api_key: Annotated[str | None, Security(API_KEY)] = None) -> str:
    return owner_of(svc, x_api_key)


def page_owner(svc: ServiceDep,
               x_api_key: Annotated[str | None, Security(API_KEY)] = None,
               key: Annotated[str | None, Security(API_KEY_QUERY)] = None) -> str:
    return owner_of(svc, x_api_key or key)


async def socket_owner(websocket: WebSocket) -> str | None:
    """The WebSocket's owner by the same check as the HTTP routes (rate limit included); the
    key comes as ``?key=`` or as the second subprotocol (``["neurorecon", <key>]``), since
    browsers cannot set headers. None after closing the socket (1008, with the reason)."""
    svc: Service = websocket.app.state.service
    key = websocket.query_params.get("key") or next(iter(subprotocols(websocket)[1:2]), None)
    try:
        return owner_of(svc, key)
    except HTTPException as exc:
        await websocket.close(code=1008, reason=str(exc.detail)[:120])
        return None


def subprotocols(websocket: WebSocket) -> list[str]:
    """The subprotocols the client offered, in order."""
    return [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")
            if p.strip()]


#: an API route's owner (``X-API-Key``)
Owner = Annotated[str, Depends(api_owner)]
#: a page's owner (``X-API-Key`` or ``?key=``)
PageOwner = Annotated[str, Depends(page_owner)]
