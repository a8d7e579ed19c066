"""``jaxpersona serve``: the HTTP side of the OpenAI-compatible server, on the ecosystem's ASGI stack
(FastAPI on uvicorn, one worker: each worker would load its own engine).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus, :mod:`jaxpersona.serve.metrics`), ``GET /`` (the playground, static files shipped
in the package), ``GET /openapi.json`` and ``/docs``.

A request is read (with a read timeout: a body shorter than its ``Content-Length`` or a slow sender gets a
408), its JSON checked before use (depth, lone surrogates, numbers out of range: 400s), parsed into engine
sequences (:mod:`jaxpersona.serve.protocol`) and handed to the one :class:`~jaxpersona.serve.engine.Engine`
thread; the event loop awaits the answer, JSON or SSE chunks in OpenAI's format ending ``data: [DONE]`` (also
after an error). A client that disconnects, streamed or not, has its choices cancelled: each frees its row
at the engine's next step. A full queue answers 429 with ``Retry-After``; uvicorn bounds the connections
(``max_connections``, 503 beyond); shutdown lets in-flight requests finish (up to ``graceful_seconds``).
Anything unexpected becomes an OpenAI-shaped 500 (``x-request-id`` in it), logged without the request body.

Privacy: request bodies and headers are never logged; the access log (off with ``--quiet``) is one line of
time, method, path (without query), status, seconds and request id. The API key is compared in constant time
and never printed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from jaxpersona import errors
from jaxpersona.compute.handle import Model, load
from jaxpersona.model.sharding import make_mesh
from jaxpersona.serve.engine import Engine, EngineConfig
from jaxpersona.serve.metrics import CONTENT_TYPE, Metrics, TimedEvents
from jaxpersona.serve.protocol import (
    Abandoned,
    Parsed,
    abandon,
    collect,
    extension,
    parse_request,
    stream_chunks,
)
from jaxpersona.serve.resources import build_resources
from jaxpersona.version import __version__

__all__ = ["PersonaServer", "ServerOptions", "build_resources", "run_server"]

MAX_BODY = 32 << 20  # bytes
MAX_DEPTH = 32  # JSON nesting a request may have (OpenAI's bodies need 6)
MAX_INT = 2**63 - 1
STATIC = Path(__file__).parent / "static"


def _log(line: str) -> None:
    """One log line on stderr (never a request body, header or key)."""
    sys.stderr.write(line.rstrip("\n") + "\n")


class ServerOptions:
    """HTTP-side limits. ``read_timeout``: seconds to receive a whole body (then 408); ``request_timeout``:
    seconds a request may take in all (None: no limit; then 504 / an error chunk); ``max_connections``:
    concurrent connections (uvicorn answers 503 beyond); ``keep_alive``: idle seconds a connection stays
    open; ``graceful_seconds``: how long shutdown waits for in-flight requests."""

    def __init__(self, *, read_timeout: float = 30.0, request_timeout: float | None = None,
                 max_connections: int = 512, keep_alive: float = 5.0, graceful_seconds: float = 30.0) -> None:
        limits = [("read_timeout", read_timeout), ("keep_alive", keep_alive), ("graceful_seconds", graceful_seconds)]
        if request_timeout is not None:  # None: no limit; 0 or less is refused like the others
            limits.append(("request_timeout", request_timeout))
        for name, v in limits:
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise errors.InputError(f"serve: {name} must be a positive number of seconds, got {v!r}")
        if int(max_connections) != max_connections or max_connections < 1:
            raise errors.InputError(f"serve: max_connections must be an integer >= 1, got {max_connections!r}")
        self.read_timeout, self.request_timeout = float(read_timeout), request_timeout
        self.max_connections, self.keep_alive, self.graceful_seconds = int(max_connections), keep_alive, graceful_seconds


# --- the JSON a request may carry -----------------------------------------------------------------------
def parse_body(raw: bytes) -> Any:
    """``raw`` -> a JSON value, or a 400 :class:`~jaxpersona.errors.RequestError`: malformed JSON, NaN /
    Infinity, numbers out of range (``1e400``, integers past 64 bits), nesting deeper than ``MAX_DEPTH``,
    strings that are not valid Unicode (lone surrogates such as ``"\\ud800"``)."""
    def no_constants(c: str) -> Any:
        raise ValueError(f"{c} is not valid JSON (numbers must be finite)")

    def finite(text: str) -> float:
        x = float(text)
        if not math.isfinite(x):
            raise _OutOfRange(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
        return x

    def bounded(text: str) -> int:
        x = int(text)
        if abs(x) > MAX_INT:
            raise _OutOfRange(f"the integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range (64 bits)")
        return x

    if _too_deep(raw):
        raise errors.RequestError(f"the JSON body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:
        value = json.loads(raw, parse_constant=no_constants, parse_float=finite, parse_int=bounded)
    except RecursionError:
        raise errors.RequestError(f"the JSON body is nested deeper than {MAX_DEPTH} levels",
                                  code="invalid_json") from None
    except _OutOfRange as e:
        raise errors.RequestError(f"malformed JSON body: {e}", code="non_finite") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.RequestError(f"malformed JSON body: {e}", code="invalid_json") from None
    _check_strings(value)
    return value


class _OutOfRange(ValueError):
    pass


def _too_deep(raw: bytes) -> bool:
    """Nesting depth of ``[``/``{`` outside strings exceeds ``MAX_DEPTH`` (checked before parsing)."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_DEPTH:
        return False
    depth, in_str, esc = 0, False, False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif b in (0x5D, 0x7D):
            depth -= 1
    return False


def _check_strings(value: Any) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise errors.RequestError("a string in the body is not valid Unicode (a lone surrogate such as "
                                          "\\ud800)", code="invalid_json") from None


def _error(e: errors.RequestError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


# --- the outermost layer: request id, access log, catch-all ---------------------------------------------
_RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Outer:
    """Pure ASGI middleware around everything: echoes (or makes) ``x-request-id``, writes the access log line,
    counts responses, and turns any exception into an OpenAI-shaped 500 (its type and traceback are logged,
    never its message or the body)."""

    def __init__(self, app: Any, server: PersonaServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0, status, logged = time.perf_counter(), [0], [False]

        def finished() -> None:  # once per request: metrics and the access line, before the client has it all
            if not logged[0]:
                logged[0] = True
                self.server.metrics.response(status[0] or 499)
                if self.server.access_log:
                    _log(f"{time.strftime('%H:%M:%S')} {scope.get('method')} {scope.get('path', '')} "
                         f"{status[0] or 499} {time.perf_counter() - t0:.3f}s rid={rid}")

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - every request gets an answer
            _log(f"request {rid}: unhandled {type(e).__name__}\n{''.join(traceback.format_tb(e.__traceback__))}")
            if not status[0]:
                body = errors.RequestError(f"internal server error ({type(e).__name__}); request id {rid}",
                                           status=500, kind="server_error", code="internal_error").body()
                data = json.dumps(body).encode()
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(data)).encode())]})
                await send_with_id({"type": "http.response.body", "body": data})
        finally:
            finished()


# --- the application ------------------------------------------------------------------------------------
_REQUEST_SCHEMA = {"type": "object", "description": "OpenAI's request body plus jaxpersona's `interventions`, "
                   "`persona_readout`, `mixture` and `adapter` fields (see the module docs of "
                   "jaxpersona.serve.protocol)", "additionalProperties": True}


def create_app(server: PersonaServer) -> Any:
    """The ASGI application of ``server`` (FastAPI inside :class:`Outer`)."""
    api = FastAPI(title="jaxpersona", version=__version__,
                  description="OpenAI-compatible server with per-request steer / cap / ablate, adapters, mixtures "
                              "and a persona readout.")
    opts = server.options

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        what = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return _error(errors.RequestError(what, status=exc.status_code, code=code))

    def authorized(request: Request) -> JSONResponse | None:
        if server.api_key is None:
            return None
        got = request.headers.get("authorization", "")
        token = got[7:] if got.startswith("Bearer ") else ""
        if hmac.compare_digest(token.encode(), server.api_key.encode()):
            return None
        return _error(errors.RequestError("missing or incorrect API key (send `Authorization: Bearer KEY`)",
                                          status=401, code="invalid_api_key"))

    async def read_json(request: Request) -> Any:
        # the content type is not checked: `curl -d` sends form-urlencoded; a body that is not JSON gets a 400
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise errors.RequestError(f"request body over {MAX_BODY >> 20} MiB" if length.isdigit()
                                      else "bad Content-Length", status=413 if length.isdigit() else 400)
        chunks, size = [], 0
        try:
            with anyio.fail_after(opts.read_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise errors.RequestError(f"request body over {MAX_BODY >> 20} MiB", status=413)
                    chunks.append(chunk)
        except TimeoutError:
            raise errors.RequestError(f"the request body did not arrive within {opts.read_timeout:g} s",
                                      status=408, code="request_timeout") from None
        raw = b"".join(chunks)
        if not raw:
            raise errors.RequestError("a JSON body is required", code="invalid_json")
        return parse_body(raw)

    async def completions(request: Request, kind: str) -> Response:
        denied = authorized(request)
        if denied is not None:
            return denied
        try:
            body = await read_json(request)
            req = await anyio.to_thread.run_sync(parse_request, kind, body, server.res, server.model, server.engine)
            server.submit(req, body)
        except errors.RequestError as e:
            retry = {"Retry-After": str(server.retry_after())} if e.status == 429 else None
            return _error(e, retry)
        if req.stream:
            return StreamingResponse(server.sse(req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await server.whole(request, req)

    @api.post("/v1/chat/completions", summary="Chat completion (OpenAI format, + interventions)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}})
    async def chat(request: Request) -> Response:
        return await completions(request, "chat")

    @api.post("/v1/completions", summary="Text completion (OpenAI format, + interventions)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}})
    async def complete(request: Request) -> Response:
        return await completions(request, "completion")

    @api.get("/v1/models", summary="The served model and its adapters")
    async def models(request: Request) -> Response:
        denied = authorized(request)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": server.model_list()})

    @api.get("/health", summary="Liveness: 200 while the engine runs")
    @api.get("/v1/health", include_in_schema=False)
    async def health() -> Response:
        ok = server.engine.failure is None
        return JSONResponse({"status": "ok" if ok else "failed", **server.engine.busy()}, status_code=200 if ok else 503)

    @api.get("/metrics", summary="Prometheus metrics (vLLM's names, `jaxpersona:` prefix)")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @api.get("/", include_in_schema=False)
    async def playground() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return _error(errors.RequestError("the playground is not installed with this package", status=404,
                                              code="not_found"))
        return FileResponse(page, media_type="text/html")

    api.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")
    return Outer(api, server)


# --- the server -----------------------------------------------------------------------------------------
class PersonaServer:
    """The engine plus the ASGI app on uvicorn, listening on ``host:port`` (port 0 picks a free one);
    :attr:`url` is the ``/v1`` base. ``api_key``: required bearer token, or None. :meth:`start` serves on a
    background thread (tests, notebooks); :meth:`serve_forever` on the calling thread (the CLI: SIGINT /
    SIGTERM shut down gracefully)."""

    def __init__(self, model: Model, resources: Any, ecfg: Any, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, access_log: bool = False, mesh: Any = None,
                 options: ServerOptions | None = None) -> None:
        self.model, self.res, self.api_key, self.access_log = model, resources, api_key, access_log
        self.options = options or ServerOptions()
        model.base_only("the server")
        self.engine = Engine(model.params, model.cfg, model.tokenizer, model.eos_ids, model.pad_id, ecfg, mesh, adapters=resources.adapter_stack)
        self.metrics = Metrics(self.engine, resources.model_name)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)  # a burst of clients waits in the backlog
        bound = self.sock.getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}/v1"
        self.app = create_app(self)
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="on", loop="asyncio", http="h11",
            limit_concurrency=self.options.max_connections, timeout_keep_alive=int(math.ceil(self.options.keep_alive)),
            timeout_graceful_shutdown=int(math.ceil(self.options.graceful_seconds))))
        self._thread: threading.Thread | None = None

    # --- requests (called from the app) ----------------------------------------------------------------
    def submit(self, req: Parsed, body: dict) -> None:
        """Hand a parsed request to the engine (429 when the queue is full) and count it in the metrics."""
        events = TimedEvents(req.events, self.metrics)
        req.events = events
        for s in req.seqs:
            s.events = events
        self.engine.submit(req.seqs)
        kinds = []
        for spec in extension(body, "interventions") or []:
            kinds.append("preset" if isinstance(spec, str) or "preset" in spec else str(spec.get("kind")))
        if extension(body, "mixture") is not None:
            kinds.append("mixture")
        if extension(body, "persona_readout") is not None:
            kinds.append("readout")
        self.metrics.admitted(req.prompt_tokens, kinds, getattr(req.seqs[0], "adapter", None))

    def retry_after(self) -> int:
        """Seconds a client turned away by a full queue should wait: about one turnover of the batch (64
        decode steps at the measured step time), 1..60."""
        st = self.engine.stats
        step = st["step_seconds"] / st["steps"] if st["steps"] else 0.05
        return int(min(60, max(1, math.ceil(64 * step))))

    async def sse(self, req: Parsed) -> Any:
        """The SSE body of a streamed request: OpenAI chunks, then ``data: [DONE]`` (also after an error).
        A client that leaves (the task is cancelled) or a request past its timeout is abandoned."""
        gen = stream_chunks(req, self.model.tokenizer, self.res.model_name)
        deadline = None if self.options.request_timeout is None else time.monotonic() + self.options.request_timeout
        finished = False
        try:
            while True:
                with anyio.move_on_after(None if deadline is None else max(0.0, deadline - time.monotonic())) as scope:
                    chunk = await anyio.to_thread.run_sync(next, gen, None, abandon_on_cancel=True)
                if scope.cancelled_caught:
                    raise errors.RequestError(f"the request took over {self.options.request_timeout:g} s",
                                              status=504, kind="server_error", code="request_timeout")
                if chunk is None:
                    break
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            finished = True
            yield b"data: [DONE]\n\n"
        except errors.RequestError as e:
            yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        except Abandoned:
            pass
        except Exception as e:  # noqa: BLE001 - the stream still ends properly
            _log(f"stream {req.id}: unhandled {type(e).__name__}\n{''.join(traceback.format_tb(e.__traceback__))}")
            err = errors.RequestError(f"internal server error ({type(e).__name__})", status=500,
                                      kind="server_error", code="internal_error")
            yield b"data: " + json.dumps(err.body()).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:
                abandon(req)

    async def whole(self, request: Request, req: Parsed) -> Response:
        """A non-streamed answer, while watching for the client leaving (then the request is abandoned)."""
        result: list[Any] = []

        async def answer() -> None:
            try:
                result.append(await anyio.to_thread.run_sync(collect, req, self.model.tokenizer, self.res.model_name,
                                                             abandon_on_cancel=True))
            except (errors.RequestError, Abandoned) as e:
                result.append(e)
            tg.cancel_scope.cancel()

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    result.append(Abandoned())
                    tg.cancel_scope.cancel()
                    return

        timeout = self.options.request_timeout
        with anyio.move_on_after(timeout) as limit:
            async with anyio.create_task_group() as tg:
                tg.start_soon(answer)
                tg.start_soon(watch)
        if limit.cancelled_caught and not result:
            abandon(req)
            return _error(errors.RequestError(f"the request took over {timeout:g} s", status=504,
                                              kind="server_error", code="request_timeout"))
        out = result[0] if result else Abandoned()
        if isinstance(out, Abandoned):
            abandon(req)
            return Response(status_code=499)  # nobody reads it
        if isinstance(out, errors.RequestError):
            return _error(out)
        return JSONResponse(out)

    def model_list(self) -> list[dict[str, Any]]:
        """``/v1/models``: the served model (with what requests may name) and each adapter as its own model,
        as vLLM lists LoRA modules (``parent`` = the base)."""
        name = self.res.model_name
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "jaxpersona", "root": name, "parent": None,
                 "jaxpersona": self.res.describe()}]
        for adapter, info in sorted((getattr(self.res, "adapters", None) or {}).items()):
            data.append({"id": adapter, "object": "model", "created": 0, "owned_by": "jaxpersona",
                         "root": str(info.get("path", adapter)) if isinstance(info, dict) else adapter,
                         "parent": name})
        return data

    # --- lifecycle ------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Compile the prefill block and the decode step at every attention span (the decode step only when
        called before the engine started) and the steps with interventions + readout (two small requests;
        starts the engine), so first requests do not wait for the compiler."""
        import numpy as np

        d = self.model.cfg.d_model
        bodies = [{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0},
                  {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.5,
                   "interventions": [{"kind": "steer", "vector": np.ones(d).tolist(), "layers": 1, "coeff": 0.0}],
                   "persona_readout": [{"name": "w", "vector": np.ones(d).tolist(), "layer": 1}]}]
        self.engine.compile_shapes(decode=not self.engine.started)
        self.engine.start()
        for body in bodies:
            req = parse_request("chat", body, self.res, self.model, self.engine)
            self.engine.submit(req.seqs)
            collect(req, self.model.tokenizer, self.res.model_name)

    def _serve(self) -> None:
        anyio_limit = max(40, self.engine.ecfg.max_queue + 32)  # one worker thread per request awaiting events

        async def main() -> None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = anyio_limit
            await self.uvicorn.serve(sockets=[self.sock])

        asyncio.run(main())

    def start(self) -> PersonaServer:
        """Start the engine and serve on a background thread; returns once the server accepts requests."""
        self.engine.start()
        self._thread = threading.Thread(target=self._serve, name="jaxpersona-http", daemon=True)
        self._thread.start()
        for _ in range(600):
            if self.uvicorn.started or not self._thread.is_alive():
                break
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until SIGINT / SIGTERM (in-flight requests finish first), then stop the engine."""
        try:
            self._serve()
        except KeyboardInterrupt:
            pass
        finally:
            self.sock.close()
            self.engine.stop()

    def close(self) -> None:
        """Graceful shutdown: stop accepting, let in-flight requests finish, stop the engine."""
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.options.graceful_seconds + 10)
        self.sock.close()
        self.engine.stop()

    def __enter__(self) -> PersonaServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_server(model: str, dtype: str = "float32", *, matmul_dtype: str | None = None, banks: list[str] | None = None,
               presets: list[str] | None = None, adapters: list[str] | None = None, served_name: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, batch: int = 8, max_context: int = 1024,
               max_interventions: int = 4, max_readout: int = 4, max_queue: int = 256, prefill_rows: int | None = None,
               mesh: str | None = None, api_key: str | None = None, warmup: bool = True, access_log: bool = True,
               read_timeout: float = 30.0, request_timeout: float | None = None, max_connections: int = 512,
               graceful_seconds: float = 30.0, prefill_chunk: int = 16, attn_block: int = 64,
               prefix_cache_mb: float = 256.0, max_mixture: int = 8) -> int:
    """``jaxpersona serve``: load ``model`` (registered name, HF directory or .gguf; on a ``DATAxMODEL``
    ``mesh`` when given), warm up, listen on ``host:port`` until SIGINT / SIGTERM. ``banks``: vector bank
    directories requests may name; ``presets``: ``NAME=FILE`` intervention presets; ``adapters``: ``NAME=DIR``
    LoRA adapters (peft or Orbax) requests select by ``"model": NAME``; ``served_name``: the model id clients
    send (default ``model``); ``api_key``: required as ``Authorization: Bearer`` (None: open). The engine
    options are :class:`~jaxpersona.serve.engine.EngineConfig`'s, the HTTP ones :class:`ServerOptions`'."""
    ecfg = EngineConfig(batch=batch, max_context=max_context, max_interventions=max_interventions,
                        max_readout=max_readout, max_queue=max_queue,
                        prefill_rows=min(8, batch) if prefill_rows is None else prefill_rows,
                        prefill_chunk=prefill_chunk, attn_block=attn_block, prefix_cache_mb=prefix_cache_mb,
                        max_mixture=max_mixture)
    options = ServerOptions(read_timeout=read_timeout, request_timeout=request_timeout,
                            max_connections=max_connections, graceful_seconds=graceful_seconds)
    device_mesh = make_mesh(mesh) if mesh else None
    handle = load(model, dtype, mesh=device_mesh, matmul_dtype=matmul_dtype)
    extra = {"adapters": list(adapters)} if adapters else {}
    res = build_resources(handle, list(banks or []), list(presets or []), served_name or str(model),
                          max_interventions, max_readout, max_mixture=max_mixture, **extra)
    try:
        server = PersonaServer(handle, res, ecfg, host=host, port=port, api_key=api_key, access_log=access_log,
                               mesh=device_mesh, options=options)
    except OSError as e:
        raise errors.InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if warmup:
        t = time.perf_counter()
        server.warmup()  # starts the engine
        print(f"compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    else:
        server.engine.start()
    print(f"serving {res.model_name} on {server.url} (batch {ecfg.batch}, {len(res.vectors)} bank vectors, "
          f"presets: {', '.join(sorted(res.presets)) or 'none'}{', API key required' if api_key else ''}; "
          f"playground: {server.url[:-3]}/, metrics: {server.url[:-3]}/metrics)", file=sys.stderr, flush=True)
    if server.engine.cpu_kernel:
        print("decode steps read the float32 projection weights with the CPU kernel (JAXPERSONA_CPU_KERNEL=0: "
              "XLA's dots)", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0
