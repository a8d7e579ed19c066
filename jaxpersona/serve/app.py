"""``jaxpersona serve``: the HTTP side (standard library only) of the OpenAI-compatible server.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.
Each HTTP connection gets a thread that validates its request, hands the choices to the one
:class:`~jaxpersona.serve.engine.Engine` thread, and writes the answer (JSON, or SSE chunks while the
engine produces them). Bad requests get a 4xx body in OpenAI's error shape and nothing else changes.

Privacy: request bodies and headers are never logged; the access log (off with ``--quiet``) is one line of
method, path (without query), status and seconds. The API key is read from an environment variable
(``--api-key-env``), compared in constant time and never printed.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jaxpersona import errors
from jaxpersona.compute.handle import Model, load
from jaxpersona.model.sharding import make_mesh
from jaxpersona.serve.engine import Engine, EngineConfig
from jaxpersona.serve.protocol import collect, parse_request, stream_chunks
from jaxpersona.serve.resources import build_resources

__all__ = ["PersonaServer", "build_resources", "run_server"]

MAX_BODY = 32 << 20  # bytes


# --- the server -----------------------------------------------------------------------------------------
class PersonaServer:
    """The engine plus a threaded HTTP server on ``host:port`` (port 0 picks a free one); :attr:`url` is the
    ``/v1`` base. ``api_key``: required bearer token, or None."""

    def __init__(self, model: Model, resources: Any, ecfg: Any, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, access_log: bool = False, mesh: Any = None) -> None:
        self.model, self.res, self.api_key, self.access_log = model, resources, api_key, access_log
        model.base_only("the server")
        self.engine = Engine(model.params, model.cfg, model.tokenizer, model.eos_ids, model.pad_id, ecfg, mesh)
        self.httpd = _HTTPServer((host, port), _handler(self))
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    def warmup(self) -> None:
        """Compile the decode step (plain, and with interventions + readout) and the prefill of every prompt
        bucket up to 512 tokens (or half the context), so first requests do not wait for the compiler."""
        import numpy as np


        d = self.model.cfg.d_model
        bodies = [{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0},
                  {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.5,
                   "interventions": [{"kind": "steer", "vector": np.ones(d).tolist(), "layers": 1, "coeff": 0.0}],
                   "persona_readout": [{"name": "w", "vector": np.ones(d).tolist(), "layer": 1}]}]
        for body in bodies:
            req = parse_request("chat", body, self.res, self.model, self.engine)
            self.engine.submit(req.seqs)
            collect(req, self.model.tokenizer, self.res.model_name)
        self.engine.compile_prefills(limit=512)

    def start(self) -> PersonaServer:
        self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="jaxpersona-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.stop()

    def __enter__(self) -> PersonaServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of clients waits in the listen backlog instead of being refused
    allow_reuse_address = True


def _handler(server: PersonaServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "jaxpersona"

        # --- plumbing ---------------------------------------------------------------------------
        def _send(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: errors.RequestError) -> None:
            self._send(e.status, e.body())

        def _authorized(self) -> bool:
            if server.api_key is None:
                return True
            got = self.headers.get("Authorization", "")
            token = got[7:] if got.startswith("Bearer ") else ""
            if hmac.compare_digest(token.encode(), server.api_key.encode()):
                return True
            self._error(errors.RequestError("missing or incorrect API key (send `Authorization: Bearer KEY`)",
                                            status=401, code="invalid_api_key"))
            return False

        def _body(self) -> Any:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise errors.RequestError("a JSON body with Content-Length is required", status=411)
            if int(length) > MAX_BODY:
                raise errors.RequestError(f"request body over {MAX_BODY >> 20} MiB", status=413)
            raw = self.rfile.read(int(length))

            def no_constants(c: str) -> Any:
                raise ValueError(f"{c} is not valid JSON (numbers must be finite)")

            try:
                return json.loads(raw, parse_constant=no_constants)
            except (ValueError, UnicodeDecodeError) as e:
                raise errors.RequestError(f"malformed JSON body: {e}", code="invalid_json") from None

        # --- routes -----------------------------------------------------------------------------
        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if path in ("/health", "/v1/health"):
                ok = server.engine.failure is None
                self._send(200 if ok else 503, {"status": "ok" if ok else "failed", **server.engine.busy()})
            elif path == "/v1/models":
                if self._authorized():
                    self._send(200, {"object": "list", "data": [
                        {"id": server.res.model_name, "object": "model", "created": 0, "owned_by": "jaxpersona",
                         "jaxpersona": server.res.describe()}]})
            else:
                self._error(errors.RequestError(f"no route GET {path}", status=404, code="not_found"))

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}.get(path)
            if kind is None:
                self._error(errors.RequestError(f"no route POST {path}", status=404, code="not_found"))
                return
            if not self._authorized():
                return
            try:
                req = parse_request(kind, self._body(), server.res, server.model, server.engine)
                server.engine.submit(req.seqs)
            except errors.RequestError as e:
                self._error(e)
                return
            tok, name = server.model.tokenizer, server.res.model_name
            if not req.stream:
                try:
                    self._send(200, collect(req, tok, name))
                except errors.RequestError as e:
                    self._error(e)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            try:
                for chunk in stream_chunks(req, tok, name):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except errors.RequestError as e:
                self.wfile.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
            except (BrokenPipeError, ConnectionResetError):  # the client left: free its rows
                for s in req.seqs:
                    s.cancelled.set()

        # --- logging: never bodies or headers ---------------------------------------------------
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            if server.access_log:
                path = self.path.split("?")[0]
                sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.command} {path} {code}\n")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - errors only, no request data
            if server.access_log and args and str(args[0]).isdigit():
                sys.stderr.write(f"{time.strftime('%H:%M:%S')} http error {args[0]}\n")

    return Handler


def run_server(model: str, dtype: str = "float32", *, banks: list[str] | None = None,
               presets: list[str] | None = None, served_name: str | None = None, host: str = "127.0.0.1",
               port: int = 8000, batch: int = 8, max_context: int = 1024, max_interventions: int = 4,
               max_readout: int = 4, max_queue: int = 256, prefill_rows: int = 1, mesh: str | None = None,
               api_key: str | None = None, warmup: bool = True, access_log: bool = True) -> int:
    """``jaxpersona serve``: load ``model`` (registered name, HF directory or .gguf; on a ``DATAxMODEL``
    ``mesh`` when given), warm up, listen on ``host:port`` until interrupted. ``banks``: vector bank
    directories requests may name; ``presets``: ``NAME=FILE`` intervention presets; ``served_name``: the
    model id clients send (default ``model``); ``api_key``: required as ``Authorization: Bearer`` (None:
    open). The engine options are :class:`~jaxpersona.serve.engine.EngineConfig`'s."""
    ecfg = EngineConfig(batch=batch, max_context=max_context, max_interventions=max_interventions,
                        max_readout=max_readout, max_queue=max_queue, prefill_rows=prefill_rows)
    device_mesh = make_mesh(mesh) if mesh else None
    handle = load(model, dtype, mesh=device_mesh)
    res = build_resources(handle, list(banks or []), list(presets or []), served_name or str(model),
                          max_interventions, max_readout)
    try:
        server = PersonaServer(handle, res, ecfg, host=host, port=port, api_key=api_key,
                               access_log=access_log, mesh=device_mesh)
    except OSError as e:
        raise errors.InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.engine.start()
    if warmup:
        t = time.perf_counter()
        server.warmup()
        print(f"compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    print(f"serving {res.model_name} on {server.url} (batch {ecfg.batch}, {len(res.vectors)} bank vectors, "
          f"presets: {', '.join(sorted(res.presets)) or 'none'}{', API key required' if api_key else ''})",
          file=sys.stderr, flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        server.engine.stop()
    return 0
