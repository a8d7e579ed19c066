"""A local OpenAI-format ``POST /v1/chat/completions`` server for endpoint/judge tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[dict], tuple[int, Any]]
ROUTE = "/v1/chat/completions"


class FakeOpenAI:
    """Answers each request from ``script`` (a queue of ``(status, json body or str)``), then from
    ``default(request_json)``; records every request as ``(headers, body)``. Started on creation;
    usable as a context manager (or call :meth:`close`)."""

    def __init__(self, default: Answer) -> None:
        self.default = default
        self.script: list[tuple[int, Any]] = []
        self.requests: list[tuple[dict[str, str], dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((dict(self.headers), body))
                    scripted = outer.script.pop(0) if outer.script and self.path == ROUTE else None
                if self.path != ROUTE:
                    status, out = 404, {"error": "no such route " + self.path}
                else:  # the default answer runs outside the lock: it may be slow
                    status, out = scripted if scripted is not None else outer.default(body)
                data = (out if isinstance(out, str) else json.dumps(out)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
