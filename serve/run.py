"""``neurorecon serve``: validate the settings, build the app, run uvicorn on loopback."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from neurorecon.models.common.logging import logger

from .settings import load_settings


def run(cfg: DictConfig) -> None:
    import uvicorn

    from .app import create_app

    settings = load_settings(OmegaConf.to_container(cfg.serve, resolve=True))
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serve: listening on %s, not loopback: anyone who can reach it may try "
                       "keys", settings.host)
    app = create_app(settings)
    logger.info("serve: %d bundle(s) %s on http://%s:%d (docs: /docs)",
                len(app.state.service.decoders), sorted(app.state.service.decoders),
                settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False,
                log_level="warning", timeout_graceful_shutdown=10)
