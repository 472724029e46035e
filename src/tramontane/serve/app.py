"""The FastAPI application: routes, error handlers and middleware around one engine.

    app = create_app(engine, api_key="secret", max_body_bytes=16 << 20)

`engine` is an `AsyncEngine` (or anything with its interface), already started, or None while the
model is still loading: then every API route answers 503 until `attach_engine` is called. `drain`
refuses new work (503) and lets the running requests finish."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from fastapi import FastAPI

from .. import __version__
from ..engine.types import Engine
from ..hub.files import FileStore
from ..hub.jobs import JobStore
from ..hub.modelfile import ModelSettings
from .common import FileLimits, ServerState
from .errors import install_handlers
from .middleware import CheckHost, LimitBody, RecordStatus, RequireKey
from .openapi import install_openapi
from .routes_batch import router as batch_router
from .routes_files import router as files_router
from .routes_fine_tuning import router as fine_tuning_router
from .routes_generate import router as generate_router
from .routes_misc import router as misc_router
from .routes_ollama import router as ollama_router

log = logging.getLogger("tramontane.serve")

DEFAULT_MAX_BODY_BYTES = 16 << 20
# Reachable without the API key: the health probe (load balancers), plus the web page's static files
# when serve/web.py lists them (the page must load before its user can type the key).
PUBLIC_PATHS = frozenset({"/health"})


def create_app(
    engine: Engine | None,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allow_origins: Sequence[str] = (),
    model_name: str | None = None,
    allow_request_templates: bool = False,
    allowed_hosts: Collection[str] | None = None,
    default_max_tokens: int = 4096,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    model_path: Path | None = None,
    model_settings: ModelSettings | None = None,
    default_adapter: str | None = None,
    file_limits: FileLimits | None = None,
    platform_root: Path | None = None,
) -> FastAPI:
    """The HTTP server for `engine`. `model_name` defaults to `engine.model_name`; `allow_origins`
    turns on CORS for those browser origins ("*" for any), and other origins are refused;
    `allowed_hosts` (None: any) are the Host header names it answers to; `model_path`, the served
    model's file or folder, is what Ollama's model routes describe; `model_settings`, a created model's
    Modelfile settings, apply to every request, and `default_adapter` (its ADAPTER) to every request for
    the served model. `platform_root` holds the files and jobs of /v1/files, /v1/batch and /v1/fine_tuning
    (default $TRAMONTANE_HOME/platform), within `file_limits`."""
    if engine is None and not model_name:
        raise ValueError("create_app needs a model_name when the engine is not there yet")
    state = ServerState(
        model_name=model_name or engine.model_name,
        engine=engine,
        allow_request_templates=allow_request_templates,
        default_max_tokens=default_max_tokens,
        model_path=model_path,
        settings=model_settings or ModelSettings(),
        default_adapter=default_adapter,
        files=FileStore(platform_root),
        file_limits=file_limits or FileLimits(),
        jobs=JobStore(platform_root),
        api_key=api_key,
    )
    app = FastAPI(title="tramontane", docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    app.state.tramontane = state
    install_handlers(app)
    app.include_router(generate_router)
    app.include_router(misc_router)
    app.include_router(ollama_router)
    app.include_router(files_router)
    app.include_router(batch_router)
    app.include_router(fine_tuning_router)
    install_openapi(app, __version__)
    browser: set[str] = set()
    if importlib.util.find_spec(f"{__package__}.web") is not None:  # the web chat page, at GET /
        from . import web

        app.include_router(web.router)
        browser = set(web.PAGE_PATHS)  # guarded too, but a browser is asked for the key (Basic auth)
    upload = state.file_limits.max_file_bytes + (64 << 10)  # the file and its multipart framing
    app.add_middleware(LimitBody, limit=max_body_bytes, paths={"/v1/files": max(upload, max_body_bytes)})
    if api_key:
        app.add_middleware(RequireKey, key=api_key, public=PUBLIC_PATHS, browser=frozenset(browser))
    app.add_middleware(CheckHost, allowed=allowed_hosts, origins=frozenset(allow_origins))
    if allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["*"], allow_headers=["*"])

    def record(status: int) -> None:
        if state.engine is not None:
            state.engine.metrics.record_http(status)

    app.add_middleware(RecordStatus, record=record)
    return app


def attach_engine(app: FastAPI, engine: Engine) -> None:
    """The model has loaded: serve requests with this (started) engine. Call in the event loop: the
    batch and fine-tuning jobs a previous run left resume, and its fine-tuned models are served."""
    from .batch_runner import BatchRunner
    from .finetune_runner import FineTuneRunner

    state: ServerState = app.state.tramontane
    state.engine = engine
    state.batches = BatchRunner(app, state.jobs, state.files, state.api_key, engine.queued)
    state.batches.start()
    state.fine_tuning = FineTuneRunner(state, state.file_limits.fine_tuning_workers)
    state.fine_tuning.start()


async def drain(app: FastAPI, timeout: float = 30.0) -> None:
    """New requests get 503 from now on; running ones finish (up to `timeout` s); the engine stops."""
    state: ServerState = app.state.tramontane
    if state.draining:
        return
    state.draining = True
    if state.batches is not None:
        await state.batches.stop()  # what it answered is kept: the job resumes at the next start
    if state.fine_tuning is not None:
        await state.fine_tuning.stop()  # the workers stop; their jobs resume from their checkpoints
    if state.engine is not None:
        log.info("draining: waiting for running requests (up to %g s)", timeout)
        await state.engine.shutdown(drain_timeout=timeout)
