"""Exporting a model to object storage (or a local folder), one immutable version at a time.

``destination/<version>/`` receives ``model.keras`` and ``model.json`` (so the
version loads back with :func:`kftune.models.load`), a TensorFlow SavedModel
for serving (``saved_model/``), every TFLite file found beside the model
(``*.tflite``, written by the prune step when it quantizes) and
``metadata.json`` (metrics, hyperparameters, source run, data fingerprint).
An existing version is never overwritten, and every file's checksum is read
back after the upload.

A version is complete or invisible: ``MANIFEST.json`` (every file's path, size
and MD5) is written last, in one write, and a version without it does not
exist for :func:`version_exists`, is refused by :func:`verify` and
:func:`read_version`, and is finished by exporting the same version again. A
pod killed mid-upload therefore never leaves something a reader takes for a
model, nor a version name that cannot be used again.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shutil
import tempfile
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, models, storage
from kftune.errors import ExistsError, InputError

METADATA_FILE = "metadata.json"
SAVED_MODEL_DIR = "saved_model"
MANIFEST_FILE = storage.MANIFEST_FILE
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_version() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("v%Y%m%d-%H%M%S")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Where the export step publishes the chosen model.

    Attributes:
        export_destination: gs://BUCKET/PREFIX or a folder (a mounted volume on a
            cluster); the model goes to <destination>/<version>/. Empty: the run's
            pipeline root, under exports/.
        export_version: The version folder; empty for a UTC timestamp. An existing
            version is never overwritten.
    """

    export_destination: str = ""
    export_version: str = ""

    def __post_init__(self):
        if self.export_destination:
            storage.check_location(self.export_destination, "export_destination")
        if self.export_version and not _VERSION.match(self.export_version):
            raise InputError(
                "`export_version` must start with a letter or digit and hold letters, digits, '.', '_' and '-' only "
                f"(at most 128). Received: export_version={self.export_version!r}"
            )

    def destination_for(self, pipeline_root: str) -> str:
        """The destination, defaulting to the pipeline root's ``exports`` folder."""
        return self.export_destination or f"{pipeline_root.rstrip('/')}/exports"


def version_exists(uri: str) -> bool:
    """Whether an export version is already at ``uri``, so that exporting there must be refused.

    On GCS, only a version whose manifest is there: objects without one were
    left by an export stopped part-way, which exporting the same version again
    finishes, so they must not make the version name unusable. A local version
    is published by one rename and is never partial: a folder there counts,
    with or without a manifest (an export from before manifests, or someone
    else's files), since replacing it could lose something.
    """
    return storage.version_taken(uri)


def verify(uri: str) -> dict[str, str]:
    """Checks the version at ``uri`` against its manifest (every file there, sizes and MD5s, nothing else).

    For readers that must not take a partial or altered version for a model.
    Returns the MD5 (base64) of every file the manifest lists.

    Raises:
        InputError: No manifest (an export stopped part-way), or files that differ from it.
    """
    return storage.verify_version(uri)


def read_version(uri: str, workdir: str | Path) -> Path:
    """Makes a complete, verified version available on local disk and returns its folder.

    The version is checked against its manifest before anything is downloaded,
    and the downloaded files against it again.

    Raises:
        InputError: As :func:`verify`.
        StorageError: The copy differs from the manifest (it changed while it was read).
    """
    return storage.fetch_version(uri, workdir)


def check_destination(destination: str, version: str) -> None:
    """Validates the destination and version before any work is done."""
    if not destination.strip():
        raise InputError("`destination` is empty: give gs://BUCKET/PREFIX or a local folder.")
    if storage.is_gcs(destination):
        storage.parse_gcs(destination)
    if not _VERSION.match(version):
        raise InputError(
            "`version` must start with a letter or digit and hold letters, digits, '.', '_' and '-' only "
            f"(at most 128). Received: version={version!r}"
        )


def export(
    model_dir: str | Path,
    destination: str,
    metadata: dict,
    *,
    version: str = "",
    dataset_dir: str | Path | None = None,
) -> tuple[str, dict]:
    """Writes the model and its metadata to ``destination/<version>/``.

    Args:
        model_dir: A kftune Model folder (``model.keras``, ``model.json``, any ``*.tflite``).
        destination: ``gs://BUCKET/PREFIX`` or a local folder.
        metadata: What the caller knows (source run, candidate, metrics), recorded
            in ``metadata.json`` beside what this function finds itself.
        version: The version folder; empty for a UTC timestamp.
        dataset_dir: The dataset the model was trained on; its fingerprint and
            class names are recorded.

    Returns:
        The version's URI and the MD5 (base64) of every file (``MANIFEST.json``
        included), read back from it.

    Raises:
        ExistsError: The version already exists (on GCS: its manifest is
            there); nothing is written. Objects a stopped export of the same
            version left are not a version: they are finished or replaced.
        StorageError: The bucket is missing, access was denied, or a checksum differs.
    """
    version = version or default_version()
    check_destination(destination, version)
    uri = f"{destination.rstrip('/')}/{version}"
    # Checked before the model is even loaded, so a taken version fails in a second.
    if version_exists(uri):
        hint = "" if storage.is_gcs(uri) or storage.has_manifest(uri) else (
            f" It has no {MANIFEST_FILE}, so it is no complete kftune export: remove it yourself if it is a leftover.")
        raise ExistsError(f"`{uri}` already exists and kftune never overwrites an export: choose a new version.{hint}")
    model_dir = Path(model_dir)
    model, meta = models.load(model_dir)
    tflite_files = sorted(model_dir.glob("*.tflite"))
    facts = {
        "version": version,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": dataclasses.asdict(meta) if meta else {},
        "hyperparameters": meta.hyperparameters if meta else {},
        "files": {"keras": models.MODEL_FILE, "saved_model": SAVED_MODEL_DIR,
                  "tflite": [p.name for p in tflite_files]},
    }
    if dataset_dir is not None:
        info = dataset.DatasetInfo.load(dataset_dir)
        facts.update(data_fingerprint=info.fingerprint, class_names=info.class_names, data_source=info.source)
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging, version)
        staging.mkdir()
        for path in [model_dir / models.MODEL_FILE, model_dir / models.META_FILE, *tflite_files]:
            if path.exists():
                shutil.copy2(path, staging / path.name)
        models.export_saved_model(model, staging / SAVED_MODEL_DIR)
        (staging / METADATA_FILE).write_text(json.dumps({**metadata, **facts}, indent=2, default=str))
        checksums = storage.publish_dir(staging, uri, manifest=True)
    return uri, checksums
