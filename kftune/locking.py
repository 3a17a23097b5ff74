"""A lock in storage, so that parallel search workers take turns at the oracle.

Each search worker is its own pod; they share the oracle's state folder and
must not read and rewrite it at the same time. The lock is one object created
only if absent: on local paths ``open(O_CREAT | O_EXCL)``, on GCS an upload
with ``if_generation_match=0``, which GCS itself refuses when the object exists
(the emulator in the tests ignores preconditions, so there only the local lock
is exercised under contention). A lock whose holder died (a preempted pod) is
taken over once it is older than ``stale_after``; oracle turns take seconds. A
holder on this machine (kfp.local, a single-machine run) that is no longer
running is known dead at once, and its lock taken over without waiting.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from kftune import storage
from kftune.errors import StorageError


class lock:  # noqa: N801 - used as a context manager
    """Holds the lock object at ``uri`` for the duration of a ``with`` block."""

    def __init__(self, uri: str, *, stale_after: float = 300.0, timeout: float = 1800.0, poll: float = 0.2):
        self.uri, self.stale_after, self.timeout, self.poll = uri, stale_after, timeout, poll
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._generation = None

    def _body(self) -> str:
        return json.dumps({"holder": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.time()})

    @staticmethod
    def _holder_gone(body: str) -> bool:
        """Whether the lock's holder ran on this machine and is no longer running (a pod elsewhere: unknown)."""
        try:
            held = json.loads(body)
            if held.get("host") != socket.gethostname():
                return False
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return True
        except (ValueError, KeyError, TypeError, AttributeError, PermissionError):
            return False  # not kftune's format, or another user's live process
        return False

    # ------------------------------------------------------------ local

    def _try_local(self) -> bool:
        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                age, body = time.time() - path.stat().st_mtime, path.read_text()
            except FileNotFoundError:
                return False  # released meanwhile: try again
            if self._holder_gone(body) or age > self.stale_after:
                # Renamed first, so that of two workers breaking it only one succeeds.
                broken = path.with_name(f"{path.name}.stale-{self.token}")
                try:
                    os.rename(path, broken)
                except FileNotFoundError:
                    return False
                if broken.read_text() != body:
                    # Released and taken by a live holder between the read and the rename: put
                    # that lock back (a link fails if yet another holder has it meanwhile).
                    with contextlib.suppress(FileExistsError):
                        os.link(broken, path)
                broken.unlink()
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._body())
        return True

    def _release_local(self) -> None:
        path = Path(self.uri)
        try:
            if json.loads(path.read_text()).get("holder") == self.token:
                path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    # ------------------------------------------------------------ gcs

    def _blob(self):
        bucket_name, name = storage.parse_gcs(self.uri)
        return storage._bucket(bucket_name).blob(name)

    def _try_gcs(self) -> bool:
        import datetime

        from google.api_core import exceptions

        blob = self._blob()
        body = self._body()
        try:
            with storage._requests_for(self.uri):
                blob.upload_from_string(body, if_generation_match=0, retry=storage._retry_if_generation_match(),
                                        timeout=storage._timeout())
        except exceptions.PreconditionFailed:
            with storage._requests_for(self.uri):
                held = blob.bucket.get_blob(blob.name, **storage._calls())
            if held is None:
                return False
            try:
                text = held.download_as_text(**storage._calls())
            except exceptions.NotFound:
                return False  # released between the two reads: free now, taken on the next try
            if text.find(self.token) >= 0:
                self._generation = held.generation  # our own upload, whose answer was lost and retried
                return True
            age = (datetime.datetime.now(datetime.UTC) - held.updated).total_seconds()
            if self._holder_gone(text) or age > self.stale_after:
                try:
                    with storage._requests_for(self.uri):
                        held.delete(if_generation_match=held.generation, timeout=storage._timeout())
                except (exceptions.NotFound, exceptions.PreconditionFailed):
                    pass
            return False
        with storage._requests_for(self.uri):
            blob.reload(**storage._calls())
        if self.token not in blob.download_as_text(**storage._calls()):
            return False  # someone else's write won (only where preconditions are ignored)
        self._generation = blob.generation
        return True

    def _release_gcs(self) -> None:
        from google.api_core import exceptions

        try:
            with storage._requests_for(self.uri):
                self._blob().delete(if_generation_match=self._generation, timeout=storage._timeout())
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass  # taken over as stale: the holder after us owns it now

    # ------------------------------------------------------------ protocol

    def __enter__(self) -> lock:
        gcs = storage.is_gcs(self.uri)
        deadline, poll = time.monotonic() + self.timeout, self.poll * (10 if gcs else 1)
        while not (self._try_gcs() if gcs else self._try_local()):
            if time.monotonic() > deadline:
                raise StorageError(
                    f"the search state's lock `{self.uri}` stayed taken for {self.timeout:.0f} s: another search "
                    "using the same search_state_uri is running. Wait for it, or use another search_state_uri.")
            time.sleep(poll)
            poll = min(poll * 1.5, 5.0)
        return self

    def __exit__(self, *exc) -> bool:
        if storage.is_gcs(self.uri):
            self._release_gcs()
        else:
            self._release_local()
        return False
