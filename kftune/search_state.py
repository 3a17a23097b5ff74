"""A search's oracle state, stored as one document that each oracle turn replaces whole.

keras-tuner keeps an oracle in many small files (``oracle.json``, one
``trial.json`` per trial, and kftune adds each told trial's ``result.json``)
and rewrites them in place. A worker killed while it writes one (a preempted
pod, a retried task) leaves an empty or half-written file that no later run
can load, or a trial file without the oracle file that counts it. So
keras-tuner never writes to storage here: a turn unpacks the document into a
private folder, the oracle works there, and on a clean exit the folder is
packed and the document replaced in one write (a rename locally, one object
upload on GCS). A kill at any moment leaves the state as it was before the
turn or after it, never between.

The document is gzip-compressed JSON, ``{"format": ..., "files": {path: text}}``:
one request down and one up per turn, whatever the number of trials (the
folder took a listing and one request per file): at 64 trials 11 requests and
13.8 KB a turn against 75.5 and 97.2 KB (bench/bench_search_storage.py). A state written in the earlier folder layout (``oracle/``)
is read where there is no document yet; the first turn writes the document
and leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kftune import storage
from kftune.errors import StorageError

STATE_FILE = "oracle-state.json.gz"
FORMAT = "kftune-oracle-state/1"
FOLDER_LAYOUT = "oracle"  # the earlier layout: keras-tuner's files, one object each


def pack(folder: Path) -> bytes:
    """The files under ``folder`` as one document (the same bytes for the same files)."""
    files = {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
             for p in sorted(folder.rglob("*")) if p.is_file()}
    body = json.dumps({"format": FORMAT, "files": files}, sort_keys=True).encode()
    return gzip.compress(body, mtime=0)


def unpack(data: bytes, folder: Path, uri: str) -> None:
    """Writes the files of a document made by :func:`pack` under ``folder``."""
    try:
        document = json.loads(gzip.decompress(data))
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}")
        files = {str(k): str(v) for k, v in document["files"].items()}
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StorageError(
            f"`{uri}` is not a search state kftune can read ({type(e).__name__}: {e}): it was changed by something "
            "other than kftune. Restore it from a copy, or set search_state_uri to a new folder to start the search "
            "again."
        ) from e
    for relative, text in files.items():
        target = storage.safe_join(folder, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def opened(state_uri: str | Path, *, write: bool) -> Iterator[Path]:
    """The oracle's files at ``state_uri``, in a private local folder for the ``with`` block.

    With ``write``, what the block leaves in the folder replaces the stored state
    when it ends without an error (and only if anything changed); an error, or a
    kill, leaves the stored state as it was. A writer must hold the search's lock.
    """
    root = str(state_uri).rstrip("/")
    uri = f"{root}/{STATE_FILE}"
    with tempfile.TemporaryDirectory(prefix="kftune-oracle-") as tmp:
        folder = Path(tmp, "oracle")
        folder.mkdir()
        stored = storage.read_bytes(uri)
        if stored is not None:
            unpack(stored, folder, uri)
        elif storage.exists(f"{root}/{FOLDER_LAYOUT}"):
            with storage.mirror(f"{root}/{FOLDER_LAYOUT}", write_back=None) as old:
                shutil.copytree(old, folder, dirs_exist_ok=True)
        yield folder
        if write and (packed := pack(folder)) != stored:
            storage.replace(uri, packed)
