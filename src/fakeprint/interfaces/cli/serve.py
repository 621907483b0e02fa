"""`fakeprint serve [CKPT]`: the HTTP service and web page (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import sys


def _cmd_serve(args: argparse.Namespace) -> int:
    from fakeprint.core.errors import FakeprintError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise FakeprintError("the service needs FastAPI and uvicorn: pip install 'fakeprint[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise FakeprintError(f"--port {args.port} is not a port number")
    for name in ("max_file_mb", "max_request_mb", "max_files", "max_pixels", "max_request_pixels", "workers",
                 "header_timeout", "body_idle_timeout", "body_timeout"):
        if getattr(args, name) <= 0:
            raise FakeprintError(f"--{name.replace('_', '-')} must be positive")
    if args.queue < 0:
        raise FakeprintError("--queue must be 0 or more")
    if not 0 <= args.refusal_delay <= 10:
        raise FakeprintError("--refusal-delay must be between 0 and 10 seconds")
    if args.model_calls is not None and args.model_calls < 1:
        raise FakeprintError("--model-calls must be 1 or more")
    if args.max_batch < 1 or args.deadline <= 0:
        raise FakeprintError("--max-batch must be 1 or more and --deadline positive")
    if not 0 <= args.max_wait_ms <= 1000:
        raise FakeprintError("--max-wait-ms must be between 0 and 1000")
    import os

    from fakeprint.interfaces.serve import LOOPBACK, TOKEN_ENV, Limits, build_service, run
    from fakeprint.interfaces.serve.batcher import BatchPolicy
    from fakeprint.interfaces.serve.server import check_exposure

    token = os.environ.get(TOKEN_ENV) or None
    check_exposure(args.host, token)  # before the model is loaded: a refusal should be quick
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None

    if args.threads is not None and args.threads <= 0:
        raise FakeprintError("--threads must be positive")
    if args.model_calls is None:
        args.model_calls = BatchPolicy.model_calls
    if args.threads is None:  # every usable core but one for the model calls: that one reads uploads, decodes, answers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        args.threads = max(1, (cores - 1) // args.model_calls) if cores else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    service = build_service(args.checkpoint or None, args.backend, args.device, args.threads, cam=not args.no_cam)
    limits = Limits(max_file_bytes=int(args.max_file_mb * 1024 * 1024),
                    max_request_bytes=int(args.max_request_mb * 1024 * 1024),
                    max_files=args.max_files, max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                    header_timeout=args.header_timeout, body_idle_timeout=args.body_idle_timeout,
                    body_timeout=args.body_timeout, queue=args.queue, refusal_delay=args.refusal_delay)
    if args.host not in LOOPBACK:
        print(f"fakeprint: warning: listening on {args.host}, reachable beyond this machine (API token required"
              f"{'; any Host header accepted: consider --allowed-hosts' if hosts is None else ''})", file=sys.stderr)
    cam = f"Grad-CAM on {service.cam.layer}" if service.cam else f"no Grad-CAM ({service.cam_note})"
    print(f"fakeprint: serving {service.classifier.name} ({service.source}, {service.backend} backend, {cam}) "
          f"at http://{args.host}:{args.port}/  (API docs: /docs)", file=sys.stderr)
    run(service, args.host, args.port, limits, args.workers, args.log_level, args.max_connections,
        allowed_hosts=hosts, token=token,
        batching=BatchPolicy(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, deadline_s=args.deadline,
                             model_calls=args.model_calls))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP: JSON API and a web page (FastAPI + uvicorn)",
                       description="POST /v1/predict (multipart field 'files'), GET /v1/model, GET /healthz, "
                                   "the web page at /, OpenAPI docs at /docs. Binding beyond loopback needs an "
                                   "API token in the environment variable FAKEPRINT_API_TOKEN.")
    s.add_argument("checkpoint", nargs="*", default=None,
                   help="a run folder, NAME.safetensors, MODEL.onnx or a shipped model's name (default: the shipped "
                        "model 'default'; 'accurate': 0.8 points more accurate, weaker on class 4; 'fast': twice as fast, "
                        "less accurate; 'robust': trained on re-encoded, resized and cropped copies of its files too; 'routed': pristine files to "
                        "'default', others to 'robust'); "
                        "several: their ensemble (averaged probabilities, no Grad-CAM, no "
                        "'uncertain' flag), e.g. 'accurate default fast'")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto (default): onnx for .onnx files, else torch; onnx with a checkpoint exports it in memory")
    s.add_argument("--device", default="cpu", help="PyTorch device (torch backend)")
    s.add_argument("--threads", type=int, default=None,
                   help="intra-op threads for PyTorch / onnxruntime (default: the usable cores less one, shared "
                        "among --model-calls, at least 1: the last core reads uploads, decodes and answers)")
    s.add_argument("--workers", type=int, default=2,
                   help="uploads decoded at once (default 2); the decoded images of requests that arrive together "
                        "then share one model call")
    s.add_argument("--model-calls", type=int, default=None,
                   help="model calls in flight at once (default 1); 2: the next batch starts while one runs, on 2 cores "
                        "about 10%% more requests/s at concurrency 8 but twice the p95 under hostile clients "
                        "(docs/SERVICE.md)")
    s.add_argument("--max-batch", type=int, default=64, help="images per model call at most (default 64)")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the oldest waiting request waits for others to share its model call (default 5)")
    s.add_argument("--deadline", type=float, default=30.0,
                   help="seconds a request may wait for its model call before 503 deadline_exceeded (default 30)")
    s.add_argument("--max-file-mb", type=float, default=10.0, help="largest upload per file (default 10 MiB)")
    s.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body (default 32 MiB)")
    s.add_argument("--max-files", type=int, default=32, help="most files per request (default 32)")
    s.add_argument("--max-pixels", type=int, default=2048 * 2048,
                   help="most pixels per image, read from its header before decoding (default 2048x2048)")
    s.add_argument("--max-request-pixels", type=int, default=4 * 2048 * 2048,
                   help="most pixels of all the images of one request together (default 4 x 2048x2048)")
    s.add_argument("--queue", type=int, default=16,
                   help="uploads that may be read or wait beside the busy workers; beyond that 503 with "
                        "Retry-After (default 16)")
    s.add_argument("--refusal-delay", type=float, default=0.25,
                   help="seconds after its arrival before a request refused for what it sent (400, 401, 413, 415, "
                        "422) is answered, waiting without CPU, so that a client repeating it cannot take the cores "
                        "(default 0.25; 0: at once)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers (default 10)")
    s.add_argument("--body-idle-timeout", type=float, default=10.0,
                   help="longest pause inside a request body, in seconds, before 408 (default 10)")
    s.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a whole request body may take before 408 (default 60)")
    s.add_argument("--max-connections", type=int, default=None,
                   help="concurrent connections before uvicorn answers 503; GET /healthz is exempt (default: no limit)")
    s.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header values to accept (default: loopback names when bound to "
                        "loopback, any otherwise)")
    s.add_argument("--no-cam", action="store_true", help="no Grad-CAM (saves the model copy it needs)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(fn=_cmd_serve)
