"""The HTTP service (FastAPI + uvicorn): ``fakeprint serve [CKPT]``; see docs/SERVICE.md."""

from __future__ import annotations

from .app import Service, build_service, create_app
from .server import LOOPBACK, TOKEN_ENV, run
from .uploads import ApiError, Limits

__all__ = ["LOOPBACK", "TOKEN_ENV", "ApiError", "Limits", "Service", "build_service", "create_app", "run"]
