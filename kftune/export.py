"""Exporting a model to object storage (or a local folder), one immutable version at a time.

``destination/<version>/`` receives ``model.keras``, a TensorFlow SavedModel
for serving (``saved_model/``) and ``metadata.json`` (metrics,
hyperparameters, source run, data fingerprint). An existing version is never
overwritten, and every file's checksum is read back after the upload.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import tempfile
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import models, storage
from kftune.errors import ExistsError, InputError

METADATA_FILE = "metadata.json"
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_version() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("v%Y%m%d-%H%M%S")


def check_destination(destination: str, version: str) -> None:
    """Validates the destination and version before any work is done."""
    if not destination.strip():
        raise InputError("`destination` is empty: give gs://BUCKET/PREFIX or a local folder.")
    if storage.is_gcs(destination):
        storage.parse_gcs(destination)
    if not _VERSION.match(version):
        raise InputError(f"`version` may hold letters, digits, '.', '_' and '-' only. Received: version={version!r}")


def export(model_dir: str | Path, destination: str, metadata: dict, *, version: str = "") -> tuple[str, dict]:
    """Writes the model and its metadata to ``destination/<version>/``.

    Returns the version's URI and the checksums read back from it.
    """
    version = version or default_version()
    check_destination(destination, version)
    uri = f"{destination.rstrip('/')}/{version}"
    if storage.exists(uri):
        raise ExistsError(
            f"`{uri}` already exists and kftune never overwrites an export: choose a new version."
        )
    model, meta = models.load(model_dir)
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging, version)
        staging.mkdir()
        shutil.copy2(Path(model_dir, models.MODEL_FILE), staging / models.MODEL_FILE)
        model.export(str(staging / "saved_model"))
        record = {"version": version, "model": meta.__dict__ if meta else {}, **metadata}
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2, default=str))
        checksums = storage.publish_dir(staging, uri)
    return uri, checksums
