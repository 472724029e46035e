"""`tramontane serve`: load the model behind a running HTTP server, serve, drain on SIGTERM.

The server listens at once and answers 503 (and /health "loading") while the model loads in a
background thread; then it prints "tramontane serving MODEL on http://HOST:PORT". The first SIGTERM
(or Ctrl-C) drains: new requests get 503, running ones finish, then the process exits with status 0.
A second signal stops at once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from ..errors import TramontaneError
from .app import attach_engine, create_app, drain
from .common import FileLimits
from .connections import ConnectionLimits, guarded_h11, raise_open_file_limit
from .middleware import LOOPBACK_HOSTS, host_name

if TYPE_CHECKING:
    from ..decoding.speculative import Speculation

log = logging.getLogger("tramontane.serve")
MAX_HEAD_BYTES = 64 * 1024  # a request head still arriving past this is a 400 from h11 (middleware: 431 > 32 KiB)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or free pages where /proc is absent."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_size(text: str, flag: str, *, allow_percent: bool = False) -> int:
    """'512M', '8G', '1.5G', '1000000' (bytes; K/M/G/T are powers of 1024), or with `allow_percent`,
    '20%' of the RAM available now."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT%]?)", value)
    if not found or (found.group(2) == "%" and not allow_percent):
        kinds = "a size like 512M or 8G" + (", or a percentage of free RAM like 20%" if allow_percent else "")
        raise TramontaneError(f"{flag} must be {kinds}, got {text!r}")
    number, unit = float(found.group(1)), found.group(2)
    if unit == "%":
        if not 0 < number <= 95:
            raise TramontaneError(f"{flag} percentage must be in (0, 95], got {text!r}")
        size = int(available_memory() * number / 100)
    else:
        size = int(number * _UNITS[unit])
    if size < 1:
        raise TramontaneError(f"{flag} must be at least 1 byte, got {text!r}")
    return size


def model_name_of(model: str | None) -> str:
    """The id the API serves a model under: the GGUF file's stem or the folder's name. Checks that
    the model exists, so that a typo fails before the server starts."""
    from ..errors import LoadError
    from ..hub.resolve import resolve_model
    from ..hub.store import created_name

    path = resolve_model(model)
    if not path.exists():
        raise LoadError(path, "no such file or folder")
    created = created_name(path)  # a model made by `tramontane create`: by its name in the store
    if created is not None:
        return created
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def _model_path(model: str | None) -> Path:
    from ..hub.resolve import resolve_model

    return resolve_model(model)


@dataclass
class ServeOptions:
    model: str | None
    name: str
    host: str
    port: int
    api_key: str | None
    kv_cache_memory: int
    max_queued: int
    max_running: int
    max_body_bytes: int
    block_size: int
    max_num_batched_tokens: int
    dtype: str
    quant: str | None
    drain_timeout: float
    allow_origins: list[str]
    log_level: str
    loras: dict[str, str] = field(default_factory=dict)  # LoRA adapter name -> folder
    parallel: str | None = None  # under torchrun: the sharding plan ("tp", "ep", "tp+ep")
    allow_request_templates: bool = False  # --allow-request-chat-template
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)  # --timeout-*, --max-connections*
    allowed_hosts: list[str] = field(default_factory=list)  # --allowed-host: names besides loopback ones
    default_max_tokens: int = 4096  # --default-max-tokens
    mmap: bool = True  # --no-mmap: copy packed GGUF weights in instead of mapping them
    file_limits: FileLimits = field(default_factory=FileLimits)  # --max-file-bytes, --max-files
    speculation: Speculation | None = None  # --speculative-config: every request's, unless it says otherwise
    speculative_draft: str | None = None  # --speculative-config's draft model, loaded with the served one
    kv_dtype: str = "auto"  # --kv-dtype: how the KV pool stores keys and values


def host_allowlist(opts: ServeOptions) -> frozenset[str] | None:
    """The Host names the server answers to: loopback names when it listens on loopback (and any
    --allowed-host); anything when it listens elsewhere, unless --allowed-host names them."""
    extra = {host_name(h) for h in opts.allowed_hosts}
    if host_name(opts.host) in LOOPBACK_HOSTS:
        return LOOPBACK_HOSTS | extra
    return frozenset(extra | {host_name(opts.host)}) if extra else None


def _load_model(opts: ServeOptions) -> Any:
    """The served model as the flags ask (every rank under torchrun loads its part the same way)."""
    from ..api import load

    return load(
        opts.model,
        dtype=opts.dtype,
        quant=opts.quant,
        lora=opts.loras,
        parallel=opts.parallel,
        mmap=opts.mmap,
        kv_dtype=opts.kv_dtype,
    )


def _load_engine(opts: ServeOptions) -> Any:
    """Runs in a thread: the model, then the engine around it (which allocates the KV cache)."""
    from ..api import load
    from ..engine import AsyncEngine
    from ..engine.release import release_idle_workers, return_freed_heap

    llm = _load_model(opts)
    speculation = opts.speculation
    if opts.speculative_draft is not None and speculation is not None:
        draft = load(opts.speculative_draft, dtype=opts.dtype, mmap=opts.mmap, kv_dtype=opts.kv_dtype)
        speculation = replace(speculation, method="draft_model", draft=draft)
    release_idle_workers()  # the engine thread computes from here on (engine/release.py)
    return_freed_heap()  # what loading freed, before the KV pool and the requests take their share
    engine = AsyncEngine(
        llm,
        model_name=opts.name,
        kv_cache_memory=opts.kv_cache_memory,
        block_size=opts.block_size,
        max_num_batched_tokens=opts.max_num_batched_tokens,
        max_running=opts.max_running,
        max_queued=opts.max_queued,
        dtype=llm.kv,
        speculation=speculation,
    )
    # What start-up made lives as long as the server: out of the collector's sight, so that a full
    # collection (a burst of new requests triggers one) does not scan it while every stream waits. On
    # SmolLM2 that is 210,000 objects and a 190-200 ms pause, two or three 16-client steps.
    gc.collect()
    gc.freeze()
    return engine


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Like asyncio.to_thread, but a signal that stops the server does not wait for the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(exc: BaseException | None, result: Any) -> None:
        if not future.done():
            future.set_result(result) if exc is None else future.set_exception(exc)

    def target() -> None:
        try:
            outcome: tuple[BaseException | None, Any] = (None, fn())
        except BaseException as exc:  # handed to the event loop
            outcome = (exc, None)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="tramontane-load", daemon=True).start()
    return await future


def follow_leader(opts: ServeOptions) -> int:
    """A rank > 0 under torchrun: load this rank's part of the model, build the same KV pool over its
    heads, and run every step rank 0's engine announces. Never listens on HTTP."""
    from ..engine.blocks import BlockPool
    from ..engine.runner import follow
    from ..parallel.dist import broadcast_object

    llm = _load_model(opts)
    kind, num_blocks, block_size, dtype = broadcast_object(None)  # sent by rank 0's AsyncEngine
    if kind != "pool":
        raise TramontaneError(f"rank 0 sent {kind!r} before the KV pool's size")
    follow(llm.model, BlockPool(llm.model.config, num_blocks, block_size, dtype))
    return 0


def serve(opts: ServeOptions) -> int:
    from ..api import MODEL_ADAPTER
    from ..hub.store import settings_for

    path = _model_path(opts.model)
    settings = settings_for(path)
    failure: list[BaseException] = []
    server: _Server

    async def load(app: Any) -> None:
        try:
            engine = await _in_daemon_thread(lambda: _load_engine(opts))
            engine.start()
            attach_engine(app, engine)
            while not server.started:
                await asyncio.sleep(0.02)
            print(
                f"tramontane serving {opts.name} on http://{opts.host}:{opts.port} "
                f"(decode backend: {engine.backend.name})",
                flush=True,
            )
        except Exception as exc:  # a bad model or flag: report it and stop the server
            failure.append(exc)
            server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        server.loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(load(app))
        yield
        task.cancel()
        await drain(app, opts.drain_timeout)

    app = create_app(
        None,
        model_name=opts.name,
        api_key=opts.api_key,
        max_body_bytes=opts.max_body_bytes,
        allow_origins=opts.allow_origins,
        allow_request_templates=opts.allow_request_templates,
        allowed_hosts=host_allowlist(opts),
        default_max_tokens=opts.default_max_tokens,
        file_limits=opts.file_limits,
        lifespan=lifespan,
        model_path=path,
        model_settings=settings,
        default_adapter=MODEL_ADAPTER if settings.adapter is not None else None,
    )
    config = uvicorn_config(app, opts)
    server = _Server(config, lambda: drain(app, opts.drain_timeout))
    server.run()
    if any(t.name == "tramontane-load" and t.is_alive() for t in threading.enumerate()):
        # Stopped while the model was loading: nothing to drain, and the loading thread, inside torch, cannot
        # be stopped; the interpreter's teardown would abort the process under it ("terminate called").
        print("tramontane: stopped before the model had loaded", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
    if failure:
        exc = failure[0]
        if isinstance(exc, TramontaneError):
            raise exc
        raise TramontaneError(f"could not start the engine: {type(exc).__name__}: {exc}") from exc
    return 0 if server.started else 1


def uvicorn_config(app: Any, opts: ServeOptions) -> uvicorn.Config:
    """uvicorn on h11 with the connection rules of serve/connections.py (no uvicorn-wide concurrency
    cap: the connection table caps, and the engine's queue limits the work)."""
    limits = opts.limits
    fits = raise_open_file_limit(limits.max_connections)
    if fits < limits.max_connections:
        limits = replace(limits, max_connections=fits, max_per_client=min(limits.max_per_client, fits))
    return uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level=opts.log_level,
        lifespan="on",
        timeout_graceful_shutdown=max(5, int(opts.drain_timeout)),
        http=guarded_h11(limits),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,  # request line + headers
        timeout_keep_alive=max(1, round(limits.idle_timeout)),
    )


class _Server(uvicorn.Server):
    """uvicorn's server, with a first SIGTERM / SIGINT that drains before exiting."""

    def __init__(self, config: Any, drain_fn: Callable[[], Any]) -> None:
        super().__init__(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_fn = drain_fn
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self.loop is None:
            super().handle_exit(sig, frame)  # a second signal, or before start-up: stop now
            return
        self._draining = True
        print(f"tramontane: {signal.Signals(sig).name}: draining, then exiting", file=sys.stderr, flush=True)
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain_fn()
        except Exception:
            log.exception("draining failed")
        finally:
            self.should_exit = True
