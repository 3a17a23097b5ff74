"""Exporting a model to a model base that TensorFlow Serving and KServe load as it is.

``export_destination`` is the model's base: each export is ``<base>/<N>/``, N
the next whole number (1, 2, ...), never reused or overwritten. The version's
top holds a SavedModel (``saved_model.pb``, ``variables/``, ``assets/``: what TF
Serving and KServe's ``tensorflow`` runtime load from ``<base>/<N>/``, with
kftune.serving's signatures), and beside it kftune's own files: ``model.keras``
and ``model.json`` (the version loads back with :func:`kftune.models.load`),
every TFLite file the prune step wrote, ``README.md`` (the model card,
kftune.model_card), ``metadata.json`` (metrics,
hyperparameters, source run, data fingerprint, and under ``serving`` which
candidate each file holds and which runtime serves the chosen one) and
``MANIFEST.json`` (every file's path, size and MD5, written last).

Numbers are claimed before anything is written: ``<base>/.kftune/claims/<N>.json``
is created only where none exists (an exclusive create locally, a
generation-0 precondition on GCS), so two exports racing for one base get
different numbers. A retry of the same export (same source run, same model)
finds its own claim and finishes that number instead of taking a new one.

A server polling the base never loads a version still being written. Locally
a version appears by one rename. On GCS, which has no rename, the upload goes to
``<base>/.kftune/staging/<N>/`` (no server loads a name that is not a number),
and is then copied into ``<base>/<N>/`` inside GCS, ``saved_model.pb`` after
every variable and asset and the manifest last (kftune.storage.promote_version).
kftune's own readers take only versions with a manifest.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, model_card, models, storage
from kftune.errors import ExistsError, InputError

METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"  # the model card (kftune.model_card), from metadata.json
MANIFEST_FILE = storage.MANIFEST_FILE
SAVED_MODEL_FILE = "saved_model.pb"
# Under the base, beside the numbered versions: a name no model server takes for a version.
CONTROL_DIR = ".kftune"
RUNTIME_TENSORFLOW = "tensorflow"  # TF Serving / KServe's tensorflow runtime load the SavedModel
RUNTIME_TFLITE = "kftune"  # the chosen candidate is a TFLite file: `kftune serve` runs it through LiteRT
# TF Serving reads version folders as int64; no leading zeros, so that "01" and "1" are not two names of one.
_INTEGER = re.compile(r"^[1-9][0-9]{0,17}$")
_MAX_CLAIM_TRIES = 100


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Where the export step publishes the chosen model.

    Attributes:
        export_destination: The model's base, gs://BUCKET/PREFIX or a folder (a
            mounted volume on a cluster): each export is <base>/<N>/, the layout
            TF Serving and KServe load. Empty: the run's pipeline root, under exports/.
        export_version: The version number N; empty for the next free one. A
            version that exists is never overwritten.
    """

    export_destination: str = ""
    export_version: str = ""

    def __post_init__(self):
        if self.export_destination:
            storage.check_location(self.export_destination, "export_destination")
        check_version(self.export_version, "export_version")

    def destination_for(self, pipeline_root: str) -> str:
        """The destination, defaulting to the pipeline root's ``exports`` folder."""
        return self.export_destination or f"{pipeline_root.rstrip('/')}/exports"


def check_version(version: str, parameter: str = "version") -> None:
    """Refuses a version that is not a whole number >= 1 (empty means the next one)."""
    if version and not _INTEGER.match(str(version)):
        raise InputError(
            f"`{parameter}` must be a whole number >= 1 (TF Serving and KServe load <base>/<N>/ with N an integer), "
            f"or empty for the next free number. Received: {parameter}={version!r}"
        )


def check_destination(destination: str, version: str) -> None:
    """Validates the destination and version before any work is done."""
    if not destination.strip():
        raise InputError("`destination` is empty: give gs://BUCKET/PREFIX or a local folder.")
    if storage.is_gcs(destination):
        storage.parse_gcs(destination)
    check_version(version)


def version_uri(base: str, number: int | str) -> str:
    return f"{base.rstrip('/')}/{number}"


def _claim_uri(base: str, number: int) -> str:
    return f"{base.rstrip('/')}/{CONTROL_DIR}/claims/{number}.json"


def _staging_uri(base: str, number: int) -> str:
    return f"{base.rstrip('/')}/{CONTROL_DIR}/staging/{number}"


def numbers(base: str) -> list[int]:
    """Every version number present under ``base`` (complete or not), ascending."""
    return sorted(int(name) for name in storage.children(base) if _INTEGER.match(name))


def latest(base: str) -> int | None:
    """The newest complete version under ``base`` (its manifest is there); None when there is none."""
    return next((n for n in reversed(numbers(base)) if storage.has_manifest(version_uri(base, n))), None)


def version_exists(uri: str) -> bool:
    """Whether an export version is already at ``uri``, so that exporting there must be refused.

    On GCS, only a version whose manifest is there: objects without one were
    left by a promotion stopped part-way, which exporting again finishes. A
    local version is published by one rename and is never partial: a folder
    there counts, with or without a manifest (someone else's files), since
    replacing it could lose something.
    """
    return storage.version_taken(uri)


def version_taken(base: str, version: str) -> bool:
    """Whether version ``version`` of ``base`` is claimed by an export or holds files: exporting it must be refused."""
    return version_exists(version_uri(base, version)) or storage.exists(_claim_uri(base, int(version)))


def resolve(uri: str) -> str:
    """The version ``uri`` names: itself when it is one (has a manifest), else its newest complete version.

    Raises:
        InputError: Neither: no manifest and no complete numbered version under it.
    """
    uri = uri.rstrip("/") or uri
    if storage.has_manifest(uri):
        return uri
    found = numbers(uri)
    newest = latest(uri) if found else None
    if newest is None:
        partial = f" (versions {found} have no {MANIFEST_FILE}: an export is still running or stopped part-way)" if found else ""
        raise InputError(f"`{uri}` is neither an exported version nor a model base holding one{partial}: give "
                         "<base>/<N> or the base export_destination named.")
    return version_uri(uri, newest)


def verify(uri: str) -> dict[str, str]:
    """Checks the version at ``uri`` against its manifest (every file there, sizes and MD5s, nothing else).

    Returns the MD5 (base64) of every file the manifest lists.

    Raises:
        InputError: No manifest (an export stopped part-way), or files that differ from it.
    """
    return storage.verify_version(uri)


def read_version(uri: str, workdir: str | Path) -> Path:
    """Makes a complete, verified version available on local disk and returns its folder.

    Raises:
        InputError: As :func:`verify`.
        StorageError: The copy differs from the manifest (it changed while it was read).
    """
    return storage.fetch_version(uri, workdir)


def read_card(uri: str) -> str:
    """The model card of the version at ``uri`` (local or gs://)."""
    data = storage.read_bytes(f"{uri.rstrip('/')}/{CARD_FILE}")
    if data is None:
        raise InputError(f"`{uri}` has no {CARD_FILE}: it was exported before kftune wrote model cards.")
    return data.decode()


def code_version() -> dict:
    """Which code made an export: kftune's version, the git commit when known, the image, the libraries.

    The commit is read from the checkout kftune runs from (an editable install, `make run`), or from
    KFTUNE_GIT_COMMIT, which kftune's images set at build time; the image from KFTUNE_IMAGE_REF, set
    the same way (``make images``). Unknown values are empty, never guessed.
    """
    import os
    import platform
    import subprocess

    import tensorflow as tf

    commit, dirty = os.environ.get("KFTUNE_GIT_COMMIT", ""), None
    root = Path(kftune.__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            run = {"cwd": root, "capture_output": True, "text": True, "timeout": 10, "check": True}
            commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
            # Tracked files changed since that commit: the commit alone does not name this code.
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "kftune": kftune.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "image": os.environ.get("KFTUNE_IMAGE_REF", ""),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }


def read_metadata(folder: str | Path) -> dict:
    """A version's metadata.json."""
    path = Path(folder, METADATA_FILE)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"`{path}` is missing or not JSON ({type(e).__name__}): give a version kftune "
                         "exported.") from e


def _claim(base: str, version: str, key: str, source_run: str) -> int:
    """Claims a version number for this export and returns it: the given one, or the next free one.

    An export retried after a kill (same key) gets the number its first attempt claimed.
    """
    document = json.dumps({"key": key, "source_run": source_run}, sort_keys=True).encode()
    mine = storage.read_bytes(f"{base.rstrip('/')}/{CONTROL_DIR}/keys/{key}")
    if version:
        candidates = [int(version)]
    elif mine is not None:
        candidates = [int(mine)]
    else:
        claimed = [int(Path(name).stem) for name in _claims(base)]
        start = max([0, *numbers(base), *claimed]) + 1
        candidates = list(range(start, start + _MAX_CLAIM_TRIES))
    for number in candidates:
        if storage.create_new(_claim_uri(base, number), document):
            # Looked up by a retry of this export; written after the claim, so it never names a number not held.
            storage.replace(f"{base.rstrip('/')}/{CONTROL_DIR}/keys/{key}", str(number).encode())
            return number
    holder = json.loads(storage.read_bytes(_claim_uri(base, candidates[0])) or b"{}").get("source_run") or "another export"
    if version:
        raise ExistsError(f"version {version} of `{base}` is taken (claimed by {holder}) and kftune never overwrites "
                          "an export: choose another export_version, or leave it empty for the next free number.")
    raise ExistsError(f"{_MAX_CLAIM_TRIES} version numbers of `{base}` from {candidates[0]} were claimed by others "
                      "while this export tried them: try again.")


def _claims(base: str) -> list[str]:
    claims = f"{base.rstrip('/')}/{CONTROL_DIR}/claims"
    return list(storage.list_files(claims)) if storage.exists(claims) else []


def _export_key(model_dir: Path, source_run: str) -> str:
    """Names one export across its retries: the run it comes from and the model file it publishes."""
    digest = hashlib.sha256(f"{source_run}\n{storage.md5_base64(model_dir / models.MODEL_FILE)}".encode())
    return digest.hexdigest()[:24]


def serving_facts(model_dir: Path, meta, metadata: dict) -> dict:
    """metadata.json's ``serving`` section: which candidate each file holds, and which runtime serves the chosen one."""
    from kftune import serving

    stage = (meta.stage if meta else "") or "model"
    candidate = str(metadata.get("candidate") or stage)
    chosen_file = str(metadata.get("model_file") or models.MODEL_FILE)
    tflite = chosen_file.endswith(".tflite")
    float_role = (f"the {stage} model in float: what TF Serving and KServe's tensorflow runtime load; the chosen "
                  f"candidate ({candidate}) is {chosen_file}, which `kftune serve` runs" if tflite
                  else f"the chosen candidate ({candidate}): what TF Serving and KServe's tensorflow runtime load")
    files = {SAVED_MODEL_FILE: float_role, models.MODEL_FILE: f"the {stage} model (Keras), the same weights"}
    for path in sorted(model_dir.glob("*.tflite")):
        files[path.name] = (f"the chosen candidate ({candidate}), served by `kftune serve` through LiteRT"
                            if path.name == chosen_file else f"a TFLite conversion of the {stage} model, not chosen")
    shape = list(meta.input_shape) if meta else []
    return {
        "candidate": candidate,
        "runtime": RUNTIME_TFLITE if tflite else RUNTIME_TENSORFLOW,
        "model_file": chosen_file if tflite else SAVED_MODEL_FILE,
        "class_names": list(meta.class_names) if meta else [],
        "image_size": int(shape[0]) if shape else 0,
        "channels": int(shape[-1]) if shape else 0,
        "signatures": list(serving.SIGNATURES),
        "top_k": min(serving.TOP_K, len(meta.class_names)) if meta else 0,
        "files": files,
    }


def export(
    model_dir: str | Path,
    destination: str,
    metadata: dict,
    *,
    version: str = "",
    dataset_dir: str | Path | None = None,
    extra_files: Callable[[str, dict], dict[str, bytes]] | None = None,
) -> tuple[str, dict]:
    """Writes the model and its metadata to ``destination/<N>/``.

    Args:
        model_dir: A kftune Model folder (``model.keras``, ``model.json``, any ``*.tflite``).
        destination: The model's base: ``gs://BUCKET/PREFIX`` or a local folder.
        metadata: What the caller knows (source run, candidate, model_file, metrics),
            recorded in ``metadata.json`` beside what this function finds itself.
        version: The version number; empty for the next free one.
        dataset_dir: The dataset the model was trained on; its fingerprint is recorded.
        extra_files: Called with the version's URI and its metadata before
            anything is published; the files it returns go into the version,
            covered by its manifest (the deploy step's InferenceService).

    Returns:
        The version's URI and the MD5 (base64) of every file (``MANIFEST.json``
        included), read back from it.

    Raises:
        ExistsError: The version is taken (by another export, or by files that
            are not kftune's); nothing is written.
        StorageError: The bucket is missing, access was denied, or a checksum differs.
    """
    from kftune import serving

    check_destination(destination, version)
    base = destination.rstrip("/")
    if version:
        # Checked before the model is even loaded, so a taken version fails in a second.
        uri = version_uri(base, version)
        if version_exists(uri) and not storage.exists(_claim_uri(base, int(version))):
            hint = "" if storage.is_gcs(uri) or storage.has_manifest(uri) else (
                f" It has no {MANIFEST_FILE}, so it is no complete kftune export: remove it yourself if it is a leftover.")
            raise ExistsError(f"`{uri}` already exists and kftune never overwrites an export: choose a new version.{hint}")
    model_dir = Path(model_dir)
    model, meta = models.load(model_dir)
    source_run = str(metadata.get("source_run", ""))
    number = _claim(base, version, _export_key(model_dir, source_run), source_run)
    uri = version_uri(base, number)
    if storage.has_manifest(uri):
        return uri, {**verify(uri), MANIFEST_FILE: storage.md5_base64_of(f"{uri}/{MANIFEST_FILE}")}  # a retry, already done
    tflite_files = sorted(model_dir.glob("*.tflite"))
    facts = {
        "version": str(number),
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": dataclasses.asdict(meta) if meta else {},
        "hyperparameters": meta.hyperparameters if meta else {},
        "files": {"keras": models.MODEL_FILE, "saved_model": SAVED_MODEL_FILE, "tflite": [p.name for p in tflite_files]},
        "serving": serving_facts(model_dir, meta, metadata),
        "code_version": code_version(),
    }
    if dataset_dir is not None:
        info = dataset.DatasetInfo.load(dataset_dir)
        facts.update(data_fingerprint=info.fingerprint, class_names=info.class_names, data_source=info.source,
                     splits=dict(info.splits))
        facts["serving"]["class_names"] = list(info.class_names)
    document = {**metadata, **facts}
    spec = serving.ServingSpec(document["serving"]["class_names"], document["serving"]["image_size"],
                               document["serving"]["channels"])
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging, str(number))
        # The SavedModel at the version's top, as TF Serving wants it; kftune's files beside it.
        serving.save_servable(model, staging, spec)
        for path in [model_dir / models.MODEL_FILE, model_dir / models.META_FILE, *tflite_files]:
            if path.exists():
                shutil.copy2(path, staging / path.name)
        for name, data in (extra_files(uri, document) if extra_files else {}).items():
            storage.safe_join(staging, name).write_bytes(data)
        (staging / METADATA_FILE).write_text(json.dumps(document, indent=2, default=str))
        (staging / CARD_FILE).write_text(model_card.render(json.loads((staging / METADATA_FILE).read_text())))
        if not storage.is_gcs(uri):
            return uri, storage.publish_dir(staging, uri, manifest=True)
        staged = _staging_uri(base, number)
        if not storage.has_manifest(staged):
            storage.publish_dir(staging, staged, manifest=True)
    return uri, storage.promote_version(staged, uri, last=(SAVED_MODEL_FILE,))
