"""A fault-injecting HTTP proxy on loopback, in front of the GCS emulator.

The storage client under test makes real HTTP requests to it; the proxy fails a
share of them the ways a real network and a busy GCS do, and forwards the rest
to the emulator:

- ``503`` / ``429``: GCS's JSON error body with that status (backend error,
  rate limit), the request never reaching the emulator;
- ``drop``: the connection is closed without an answer, the request unsent;
- ``lost_reply``: the request is carried out, then the connection is closed
  before its answer: the client cannot tell it from ``drop``;
- ``hang``: no answer until the client's timeout has passed; never forwarded;
- ``slow``: forwarded after a short delay, well within any timeout;
- ``ok``: forwarded;
- ``403``: access denied, as for a service account without a role on the bucket;
- ``401``: the credentials were rejected (expired or revoked token);
- ``cut``: the request is carried out and the answer's headers sent, announcing
  the whole body, then the connection is closed after half of it (a download
  cut off mid-stream);
- ``short``: the request is carried out and answered with half of its body, as
  if that were all of it (matching Content-Length, no X-Goog-Hash): a
  truncation only a checksum can tell.

Which fault meets which request follows a fixed cycle per kind of request
(``upload``, ``chunk``, ``download``, ``api``; ``chunk`` is a PUT carrying part
of a resumable upload session and follows ``upload``'s cycle where the schedule
has none), so a run is the same every time and each fault is certain to occur.
Requests that carry the bearer token ``reject_token`` are answered 401 whatever
the cycle says: an expired token, which the client must refresh.

The proxy also does what the emulator does not:

- it refuses an upload whose ``ifGenerationMatch=0`` precondition fails (the
  object exists) with 412, as GCS does. That is what a retried upload meets
  when its first attempt's answer was lost;
- it pages object listings as GCS does (at most ``page_size``, default 1,000,
  items a page, and a ``nextPageToken`` for the rest); the emulator returns
  every object in one page and ignores ``maxResults`` and ``pageToken``;
- it has the links the emulator answers with (a resumable upload session's
  ``Location``, an object's ``mediaLink``) point at the proxy, not at the
  emulator, so that it sees every chunk of a session and every download.
"""

from __future__ import annotations

import base64
import collections
import http.client
import http.server
import itertools
import json
import re
import threading
import time
from urllib.parse import parse_qs, quote, urlencode, urlsplit

FAULTS = ("503", "429", "drop", "lost_reply", "hang")


class FaultProxy(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, upstream: str, schedule: dict[str, list[str]], *, hold_s: float = 3.0,
                 page_size: int = 1000, reject_token: str | None = None):
        self.upstream = urlsplit(upstream)
        self.page_size, self.reject_token = page_size, reject_token
        self._cycles = {kind: itertools.cycle(plan) for kind, plan in schedule.items()}
        self._lock = threading.Lock()
        self.hold_s = hold_s
        self.released = threading.Event()
        self.injected: collections.Counter[str] = collections.Counter()
        self.preconditions_refused = 0
        self.requests = 0
        self.uploaded: list[str] = []  # names of the objects whose upload reached the emulator, in order
        # (kind, method, path, Content-Range or Range, action) of every request, in order of arrival.
        self.log: list[tuple[str, str, str, str, str]] = []
        self.page_tokens: list[str] = []  # the pageToken of every listing that carried one
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def next_action(self, kind: str) -> str:
        with self._lock:
            self.requests += 1
            cycle = self._cycles.get(kind) or (self._cycles.get("upload") if kind == "chunk" else None)
            action = next(cycle or self._cycles["api"])
            self.injected[action] += 1
            return action

    def seen(self, kind: str) -> list[tuple[str, str, str, str, str]]:
        """The requests of one kind that reached the proxy, in order."""
        with self._lock:
            return [entry for entry in self.log if entry[0] == kind]

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a held connection resets it: expected here

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


def _kind(method: str, path: str) -> str:
    if path.startswith("/upload/"):
        return "chunk" if "upload_id" in parse_qs(urlsplit(path).query) else "upload"
    if path.startswith("/download/") or "alt=media" in path:
        return "download"
    return "api"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """What every loopback proxy in the tests does: answer as GCS would, or forward to ``server.upstream``."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY each answer
    # waits out the client's delayed ACK (40 ms), which a thousand downloads feel.
    disable_nagle_algorithm = True
    _HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

    def _reply(self, status: int, headers, body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in self._HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, reason: str, message: str) -> None:
        body = {"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}
        self._reply(status, [("Content-Type", "application/json")], json.dumps(body).encode())

    def _upstream(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=30)
        # The emulator writes the links it answers with (a resumable session's
        # Location, an object's mediaLink) for the Host it was asked as: this
        # proxy's, so that the client's next requests come here too. Links
        # already stored with the emulator's own address are rewritten below.
        headers = {**(headers or {}), "Host": f"127.0.0.1:{self.server.server_address[1]}"}
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
        finally:
            connection.close()
        if "json" in (response.getheader("Content-Type") or ""):
            # Objects stored past the proxy keep the links they were written with.
            answer = answer.replace(f"://{self.server.upstream.netloc}/".encode(), f"://{headers['Host']}/".encode())
        return response.status, response.getheaders(), answer

    def _forward_as_is(self, body: bytes):
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP}
        return self._upstream(self.command, self.path, body, headers)

    def log_message(self, *args):
        pass


class _Handler(ProxyHandler):
    def _upload_target(self, body: bytes) -> tuple[str, str] | None:
        """(bucket, object name) of an upload request, from its URL or its multipart metadata."""
        parts = urlsplit(self.path)
        bucket = re.match(r"/upload/storage/v1/b/([^/]+)/o", parts.path)
        name = parse_qs(parts.query).get("name", [None])[0]
        if name is None:
            found = re.search(rb'"name":\s*"([^"]+)"', body)
            name = found.group(1).decode() if found else None
        return (bucket.group(1), name) if bucket and name else None

    def _precondition_fails(self, body: bytes) -> bool:
        """Whether GCS would refuse this upload: ifGenerationMatch=0 and the object exists."""
        target = self._upload_target(body)
        if target is None or parse_qs(urlsplit(self.path).query).get("ifGenerationMatch") != ["0"]:
            return False
        status, _, _ = self._upstream("GET", f"/storage/v1/b/{target[0]}/o/{quote(target[1], safe='')}")
        return status == 200

    def _page(self, status: int, headers, answer: bytes):
        """One page of an object listing, as GCS pages them (the emulator sends every object at once)."""
        if status != 200:
            return status, headers, answer
        listing = json.loads(answer)
        query = parse_qs(urlsplit(self.path).query)
        after = base64.urlsafe_b64decode(query["pageToken"][0]).decode() if "pageToken" in query else ""
        size = min(int(query.get("maxResults", [self.server.page_size])[0]), self.server.page_size)
        items = sorted((i for i in listing.get("items") or [] if i["name"] > after), key=lambda i: i["name"])
        listing["items"] = items[:size]
        if len(items) > size:
            listing["nextPageToken"] = base64.urlsafe_b64encode(items[size - 1]["name"].encode()).decode()
        return status, headers, json.dumps(listing).encode()

    def _forward(self, body: bytes):
        parts = urlsplit(self.path)
        if self.command == "GET" and re.fullmatch(r"/storage/v1/b/[^/]+/o", parts.path):
            query = parse_qs(parts.query)
            if "pageToken" in query:
                self.server.page_tokens.append(query["pageToken"][0])
            rest = [(k, v) for k, values in query.items() for v in values if k not in ("pageToken", "maxResults")]
            return self._page(*self._upstream("GET", f"{parts.path}?{urlencode(rest)}"))
        target = self._upload_target(body) if self.command == "POST" else None
        if target is not None and self._precondition_fails(body):
            self.server.preconditions_refused += 1
            message = "At least one of the pre-conditions you specified did not hold."
            return 412, [("Content-Type", "application/json")], json.dumps(
                {"error": {"code": 412, "message": message, "errors": [{"reason": "conditionNotMet"}]}}).encode()
        if target is not None:
            self.server.uploaded.append(target[1])
        return self._forward_as_is(body)

    def _any(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        kind = _kind(self.command, self.path)
        action = self.server.next_action(kind)
        token = self.server.reject_token
        if token is not None and self.headers.get("Authorization") == f"Bearer {token}":
            action = "401"
        with self.server._lock:
            span = self.headers.get("Content-Range") or self.headers.get("Range") or ""
            self.server.log.append((kind, self.command, self.path, span, action))
        if action == "401":
            return self._error(401, "authError", "Invalid Credentials (injected by the test proxy)")
        if action == "503":
            return self._error(503, "backendError", "Backend Error (injected by the test proxy)")
        if action == "429":
            return self._error(429, "rateLimitExceeded", "The rate of requests is too high (injected by the test proxy)")
        if action == "403":
            return self._error(403, "forbidden", "kftune-test@example.iam.gserviceaccount.com does not have "
                                                 "storage.objects.list access to the Google Cloud Storage bucket.")
        if action == "drop":
            self.close_connection = True
            return None
        if action == "hang":
            self.server.released.wait(self.server.hold_s)
            self.close_connection = True
            return None
        if action == "slow":
            time.sleep(0.2)
        status, headers, answer = self._forward(body)
        if action == "lost_reply":
            self.close_connection = True
            return None
        if action == "cut" and status in (200, 206) and len(answer) > 1:
            self.send_response(status)
            for key, value in headers:
                if key.lower() not in self._HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer[: len(answer) // 2])
            self.wfile.flush()
            self.close_connection = True
            return None
        if action == "short" and status in (200, 206) and len(answer) > 1:
            headers = [(k, v) for k, v in headers if k.lower() != "x-goog-hash"]
            answer = answer[: len(answer) // 2]
        return self._reply(status, headers, answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any
