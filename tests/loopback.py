"""A JSON API on loopback for the tests: a real HTTP server in a thread, which real clients call.

The servers that stand in for a Kubeflow Pipelines API (tests/kfp_server.py) and a
Kubernetes API (tests/kube_server.py) share this: each says how a request is read
(``parse``) and answered (``handle``); this serves, records and replies.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class LoopbackApi:
    """``with Server(...) as server:`` then point a client at ``server.url``; ``server.requests`` records every call."""

    def __init__(self):
        self.requests: list = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def parse(self, method: str, path: str, query: dict[str, str], raw: bytes, headers):
        """The request as the subclass records it."""
        raise NotImplementedError

    def handle(self, request) -> tuple[int, dict | str]:
        """(status, JSON payload or plain text) for a recorded request."""
        raise NotImplementedError

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = server.parse(self.command, url.path, query, raw, self.headers)
                with server._lock:  # one request at a time: the servers' state is plain dicts
                    server.requests.append(request)
                    status, payload = server.handle(request)
                text = isinstance(payload, str)
                data = (payload if text else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args):
                pass

        return Handler
