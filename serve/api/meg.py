"""The real-time MEG decoder: its state, its session settings, the WebSocket of decoded
messages (``/v1/meg/stream``) and the live page."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse

from ..live import live_page
from ..schemas import StreamSession, StreamStatus
from ..service import Service
from ..settings import StreamSettings
from .deps import Owner, PageOwner, ServiceDep, errors, page_errors, socket_owner, subprotocols

router = APIRouter(prefix="/v1/meg", tags=["MEG stream"], responses=errors(401, 422, 429))
page = APIRouter(tags=["pages"], responses=page_errors(401, 422, 429))


@router.get("/status", response_model=StreamStatus, summary="the streaming decoder's state")
def stream_status(svc: ServiceDep, owner: Owner) -> StreamStatus:
    return StreamStatus(**svc.streamer.status())


@router.get("/session", response_model=StreamSettings, summary="the stream settings in use")
def get_session(svc: ServiceDep, owner: Owner) -> StreamSettings:
    return svc.streamer.settings


@router.put("/session", response_model=StreamStatus, summary="decode another stream (the "
            "serve.stream settings, for this session)", responses=errors(400, 413))
def put_session(svc: ServiceDep, owner: Owner, settings: StreamSession) -> StreamStatus:
    svc.restart_stream(StreamSettings(**settings.model_dump()))
    return StreamStatus(**svc.streamer.status())


@router.delete("/session", response_model=StreamStatus, summary="stop decoding")
def delete_session(svc: ServiceDep, owner: Owner) -> StreamStatus:
    svc.restart_stream(svc.streamer.settings.model_copy(update={"source": None}))
    return StreamStatus(**svc.streamer.status())


@router.websocket("/stream")
async def stream_socket(websocket: WebSocket) -> None:
    """Decoded messages as JSON (key as for the pages: :func:`.deps.socket_owner`); the
    latest message first, then each new one (a slow client skips, newest wins)."""
    if await socket_owner(websocket) is None:
        return
    svc: Service = websocket.app.state.service
    await websocket.accept(subprotocol="neurorecon" if subprotocols(websocket)[:1]
                           == ["neurorecon"] else None)
    queue = svc.hub.subscribe()
    try:
        if svc.hub.latest is not None:
            await websocket.send_json(svc.hub.latest)
        while True:
            await websocket.send_json(await queue.get())
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        svc.hub.unsubscribe(queue)


@page.get("/live", response_class=HTMLResponse, summary="the live decoding page (key as ?key=)")
def live(svc: ServiceDep, owner: PageOwner) -> HTMLResponse:
    return HTMLResponse(live_page())
