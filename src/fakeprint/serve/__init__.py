"""The HTTP service (FastAPI + uvicorn): ``fakeprint serve [CKPT]``; see docs/SERVICE.md."""

from __future__ import annotations

from .app import Service, build_service, create_app
from .uploads import ApiError, Limits

__all__ = ["ApiError", "Limits", "Service", "build_service", "create_app", "run"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run(service: Service, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
        workers: int = 2, log_level: str = "info", max_connections: int | None = None) -> None:
    """Serve ``service`` with uvicorn until interrupted."""
    import uvicorn

    app = create_app(service, limits, workers)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                timeout_keep_alive=5, server_header=False)
