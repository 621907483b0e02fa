"""The HTTP service (FastAPI + uvicorn): ``fakeprint serve [CKPT]``; see docs/SERVICE.md."""

from __future__ import annotations

from fakeprint.interfaces.serve.app import Service, build_service, create_app
from fakeprint.interfaces.serve.server import LOOPBACK, TOKEN_ENV, run
from fakeprint.interfaces.serve.uploads import ApiError, Limits

__all__ = ["LOOPBACK", "TOKEN_ENV", "ApiError", "Limits", "Service", "build_service", "create_app", "run"]
