"""Reading and writing local paths and ``gs://`` URIs the same way.

Datasets, backbone weights and exported models may sit on a laptop's disk or in
Google Cloud Storage. Everything that takes a location takes either, and goes
through here, so that the GCS client's retries and the error messages a user
sees are the same everywhere. Setting ``STORAGE_EMULATOR_HOST`` points the
client at an emulator (the tests do).

Every request has a timeout and is retried with exponential backoff when GCS
answers 408/429/5xx or the connection drops or times out (google-cloud-storage's
own retry predicate). Two settings, read at each call, tune that for slow or
flaky networks: ``KFTUNE_GCS_TIMEOUT`` (seconds one request may take, default
60) and ``KFTUNE_GCS_RETRY_SECONDS`` (how long to keep retrying, default 300).
Uploads are retried only when a retry cannot do harm: publishing a version
writes with ``if_generation_match=0``, so a retry can never overwrite someone
else's object; ``mirror`` rewrites files only its own step writes.

An export version is made visible by one last write, its manifest
(``MANIFEST.json``: every file's path, size and MD5). Objects under a version
prefix without one are what an upload stopped part-way left: readers refuse
them, and publishing the same version again finishes or replaces them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from kftune.errors import ExistsError, InputError, StorageError

GCS_SCHEME = "gs://"
TIMEOUT_ENV, RETRY_ENV = "KFTUNE_GCS_TIMEOUT", "KFTUNE_GCS_RETRY_SECONDS"
DEFAULT_TIMEOUT_S, DEFAULT_RETRY_S = 60.0, 300.0
MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = "kftune-manifest/1"
# Files over 8 MiB go up in a resumable session, this many bytes a request: what
# one failed request costs to send again. google-cloud-storage's default, pinned
# here so that it does not change under kftune unnoticed.
UPLOAD_CHUNK_BYTES = 100 * 1024 * 1024


def is_gcs(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


def check_location(uri: str, parameter: str) -> None:
    """Refuses a URI kftune cannot read or write, naming the parameter it came in.

    kftune speaks local paths (a mounted volume on a cluster) and ``gs://``;
    anything else that looks like ``scheme://`` (s3://, minio://, https://) would
    otherwise be taken for a local folder named ``s3:``, written on the pod's
    disk and lost with it.
    """
    text = str(uri)
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/", text)
    if scheme and not text.startswith(GCS_SCHEME):
        raise InputError(f"`{parameter}` uses {scheme.group(1)}://, which kftune cannot read or write: give a "
                         f"gs://BUCKET/PREFIX URI or a path on a mounted volume. Received: {parameter}={text!r}")
    if is_gcs(text):
        parse_gcs(text)


def parse_gcs(uri: str) -> tuple[str, str]:
    """Splits ``gs://bucket/some/prefix`` into ``("bucket", "some/prefix")``."""
    rest = uri[len(GCS_SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InputError(f"`{uri}` names no bucket: write it as gs://BUCKET/PATH.")
    return bucket, prefix.strip("/")


@functools.lru_cache(maxsize=1)
def _client():
    # Imported here so that the core imports fast where GCS is never used.
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="kftune-emulator", credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except DefaultCredentialsError as e:
        raise StorageError(
            f"no Google Cloud credentials to reach GCS ({str(e).splitlines()[0]}): run the step with "
            "a service account (Workload Identity), or set GOOGLE_APPLICATION_CREDENTIALS to a key file."
        ) from e


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"environment variable {name} must be a number of seconds > 0. Received: {raw!r}")
    return value


def _timeout() -> tuple[float, float]:
    """(connect, read) timeout of one request."""
    seconds = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    return (min(seconds, 10.0), seconds)


def _retry():
    """google-cloud-storage's retry predicate (408, 429, 5xx, dropped connections, timeouts), with kftune's deadline."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=1.0, maximum=32.0, multiplier=2.0).with_timeout(
        _seconds(RETRY_ENV, DEFAULT_RETRY_S))


def _retry_if_generation_match():
    """Retries an upload only when it carries a generation precondition, so a retry never overwrites."""
    from google.cloud.storage.retry import ConditionalRetryPolicy, is_generation_specified

    return ConditionalRetryPolicy(_retry(), is_generation_specified, ["query_params"])


def _calls() -> dict:
    """The retry and timeout every read or listing passes to the client."""
    return {"retry": _retry(), "timeout": _timeout()}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def _denied(uri: str) -> StorageError:
    return StorageError(
        f"access to `{uri}` was denied: give the pipeline's service account "
        "roles/storage.objectAdmin on the bucket (Workload Identity), or mount a key."
    )


@contextlib.contextmanager
def _requests_for(uri: str):
    """Turns the client's refusals into StorageErrors that name ``uri`` and say what to do."""
    import requests
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError, TransportError
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    try:
        yield
    except exceptions.Forbidden as e:
        raise _denied(uri) from e
    except exceptions.Unauthorized as e:
        raise StorageError(
            f"GCS rejected the credentials used for `{uri}` ({e.message}): refresh or replace them."
        ) from e
    except (exceptions.RetryError, exceptions.TooManyRequests, exceptions.ServerError, requests.ConnectionError,
            requests.Timeout, ConnectionError, TimeoutError, TransportError, InvalidResponse, DataCorruption) as e:
        # What is left once the client's retries gave up: an outage, not a mistake. The step
        # can be retried as it is: what it already stored is kept and picked up again.
        raise StorageError(
            f"GCS kept failing for `{uri}` ({_first_line(e)}) after retrying for up to "
            f"{_seconds(RETRY_ENV, DEFAULT_RETRY_S):g} s: the service or the network is unavailable. Run the step "
            f"again (it resumes from what was stored), or raise {RETRY_ENV} to wait longer."
        ) from e
    except GoogleAuthError as e:
        # An expired token is refreshed by the client on a 401; this is what is left when
        # the refresh itself failed (a revoked key, credentials that cannot be refreshed).
        raise StorageError(
            f"GCS rejected the credentials used for `{uri}` ({_first_line(e)}): refresh or replace them."
        ) from e


def _bucket(name: str):
    """The bucket ``name``, after checking that it exists and can be read."""
    from google.api_core import exceptions

    bucket = _client().bucket(name)
    # Listing one object rather than bucket.exists(): a GET on the bucket needs
    # storage.buckets.get, which roles/storage.objectAdmin (all an export
    # needs) does not grant, while a missing bucket answers a listing with 404 too.
    with _requests_for(f"gs://{name}"):
        try:
            next(iter(bucket.list_blobs(max_results=1, **_calls())), None)
        except exceptions.NotFound as e:
            raise StorageError(
                f"GCS bucket `{name}` does not exist: create it "
                f"(gcloud storage buckets create gs://{name}) or fix the URI."
            ) from e
    return bucket


def check_reachable(uri: str) -> None:
    """Fails at once if ``uri`` is in a bucket that is missing or cannot be read; local paths pass.

    For steps that will write there only after hours of work.
    """
    if is_gcs(uri):
        _bucket(parse_gcs(uri)[0])


def check_writable(uri: str, parameter: str) -> None:
    """Fails at once, naming ``parameter``, where ``uri`` could not be written: a missing bucket,
    a local path under a file, or a folder this process may not write."""
    check_location(uri, parameter)
    if is_gcs(uri):
        check_reachable(uri)
        return
    path = Path(uri).absolute()
    if path.exists() and not path.is_dir():
        raise InputError(f"`{parameter}` `{uri}` is a file, not a folder: give a folder path.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"`{parameter}` `{uri}` is under `{existing}`, which is a file: give a folder path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"`{parameter}` `{uri}` cannot be written: `{existing}` is not writable by this user "
                         f"(uid {os.getuid()}). Give a folder it may write, or a gs:// URI.")


def _blob_name(prefix: str, relative: str) -> str:
    return f"{prefix}/{relative}" if prefix else relative


def safe_join(root: Path, relative: str) -> Path:
    """Joins ``relative`` under ``root``, refusing names that would escape it.

    Object names are whatever whoever wrote the bucket chose; ``a/../../x`` is
    a valid one, and must not become a path outside the download folder.
    """
    target = (root / relative).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise InputError(f"refusing to download `{relative}`: it points outside {root}. Rename the object.")
    return target


def _blob(bucket, name: str):
    """The object ``name``, uploaded in chunks of UPLOAD_CHUNK_BYTES where it is large."""
    return bucket.blob(name, chunk_size=UPLOAD_CHUNK_BYTES)


def _list_blobs(bucket, uri: str, prefix: str) -> dict:
    """Every object under ``prefix`` (as a folder), keyed by name relative to it, sorted.

    The client follows every page of the listing (GCS sends 1,000 objects a page).
    """
    base = f"{prefix}/" if prefix else ""
    with _requests_for(uri):
        blobs = sorted(bucket.list_blobs(prefix=base, **_calls()), key=lambda b: b.name)
    return {b.name[len(base) :]: b for b in blobs if not b.name.endswith("/")}


def _list_objects(bucket, uri: str, prefix: str) -> dict[str, str | None]:
    """The MD5 (base64) of every object under ``prefix`` (as a folder), keyed by name relative to it, sorted."""
    return {relative: blob.md5_hash for relative, blob in _list_blobs(bucket, uri, prefix).items()}


def _list_names(bucket, uri: str, prefix: str) -> list[str]:
    """Object names under ``prefix`` (as a folder), relative to it, sorted."""
    return list(_list_objects(bucket, uri, prefix))


def list_files(uri: str) -> Iterator[str]:
    """Yields the path of every file under ``uri``, relative to it, sorted."""
    if is_gcs(uri):
        bucket_name, prefix = parse_gcs(uri)
        yield from _list_names(_bucket(bucket_name), uri, prefix)
        return
    root = Path(uri)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield path.relative_to(root).as_posix()


def exists(uri: str) -> bool:
    """Whether ``uri`` is a file, or a folder / prefix holding at least one file."""
    if is_gcs(uri):
        bucket_name, prefix = parse_gcs(uri)
        bucket = _bucket(bucket_name)
        with _requests_for(uri):
            if prefix and bucket.blob(prefix).exists(**_calls()):
                return True
            base = f"{prefix}/" if prefix else ""
            return any(True for _ in bucket.list_blobs(prefix=base, max_results=1, **_calls()))
    return Path(uri).exists()


def _download_verified(blob, target: Path, md5: str | None, uri: str) -> None:
    """Downloads ``blob`` to ``target`` and checks it against the MD5 GCS listed for it.

    The client checks downloads itself where GCS sends a hash header, and resumes
    one cut off mid-stream; this check also holds where no hash is sent
    (composite objects, emulators, a proxy that drops the header). A download
    that fails either way leaves no file behind, so nothing truncated can be
    taken for the object later.
    """
    try:
        with _requests_for(uri):
            blob.download_to_filename(str(target), **_calls())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if md5 and md5_base64(target) != md5:
        target.unlink()
        raise StorageError(
            f"`gs://{blob.bucket.name}/{blob.name}` was corrupted on the way (its MD5 differs from the one GCS "
            "lists for it): run the step again."
        )


def _download(bucket, uri: str, prefix: str, dest: Path) -> dict[str, str | None]:
    """Downloads every object under ``prefix`` into ``dest``, keeping relative paths.

    Every name is checked before anything is written. Returns the MD5 of each
    object, keyed by relative path.
    """
    objects = _list_objects(bucket, uri, prefix)
    targets = [safe_join(dest, relative) for relative in objects]
    for (relative, md5), target in zip(objects.items(), targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        _download_verified(bucket.blob(_blob_name(prefix, relative)), target, md5, uri)
    return objects


def fetch(uri: str, workdir: str | os.PathLike) -> Path:
    """Makes ``uri`` (a file or a folder) available on local disk and returns its path.

    Local paths are returned as they are; ``gs://`` objects are downloaded under
    ``workdir``.
    """
    if not is_gcs(uri):
        path = Path(uri)
        if not path.exists():
            raise InputError(f"`{uri}` does not exist: check the path.")
        return path
    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    dest = safe_join(Path(workdir), f"{bucket_name}/{prefix}")
    with _requests_for(uri):
        blob = bucket.get_blob(prefix, **_calls()) if prefix else None
    if blob is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download_verified(blob, dest, blob.md5_hash, uri)
        return dest
    if not _download(bucket, uri, prefix, dest):
        raise InputError(f"`{uri}` holds no objects: check the bucket and prefix.")
    return dest


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Replaces the local file ``path`` whole: a process killed mid-write leaves the old file, never half of the new one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def read_bytes(uri: str) -> bytes | None:
    """The whole file or object at ``uri``, or None where there is none."""
    if not is_gcs(uri):
        path = Path(uri)
        return path.read_bytes() if path.is_file() else None
    from google.api_core import exceptions

    bucket_name, name = parse_gcs(uri)
    with _requests_for(uri):
        try:
            return _bucket(bucket_name).blob(name).download_as_bytes(**_calls())
        except exceptions.NotFound:
            return None


def replace(uri: str, data: bytes) -> None:
    """Stores ``data`` at ``uri`` in one write, replacing what is there.

    A reader sees the old contents or the new, never part of either: locally a
    rename, on GCS one object upload (GCS makes an object visible only once
    all of it is stored). The caller must be the only writer of ``uri`` (it
    holds a lock), since the upload is retried without a precondition.
    """
    if not is_gcs(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(uri, data)
        return
    bucket_name, name = parse_gcs(uri)
    blob = _blob(_bucket(bucket_name), name)
    with _requests_for(uri):
        blob.upload_from_string(data, content_type="application/octet-stream", retry=_retry(), timeout=_timeout())
        blob.reload(**_calls())
    if blob.md5_hash != _md5_bytes(data):
        raise StorageError(f"`{uri}` reads back with another MD5 than was written: run the step again.")


def md5_base64(path: str | os.PathLike) -> str:
    """The MD5 of a file as GCS reports it (base64 of the digest)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def _refuse_existing(uri: str) -> None:
    if exists(uri):
        raise ExistsError(
            f"`{uri}` already exists and kftune never overwrites an export: "
            "choose a new version or remove it yourself."
        )


def has_manifest(uri: str) -> bool:
    """Whether the version at ``uri`` is complete: its manifest, the last thing written, is there."""
    if not is_gcs(uri):
        return (Path(uri) / MANIFEST_FILE).is_file()
    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    with _requests_for(uri):
        return bucket.blob(_blob_name(prefix, MANIFEST_FILE)).exists(**_calls())


def version_taken(uri: str) -> bool:
    """Whether publishing a version to ``uri`` must be refused, as it would overwrite something.

    On GCS only a manifest makes a version: objects without one are a partial
    upload, which publishing the version again finishes. A local version is
    published by one rename, so kftune never leaves half of one at ``uri``:
    whatever is there (a complete version, one from before manifests, someone
    else's files) is not kftune's to replace.
    """
    return has_manifest(uri) if is_gcs(uri) else Path(uri).exists()


def _manifest(files: list[Path], local_dir: Path) -> bytes:
    """The manifest of a version: every file's relative path, size and MD5 (base64, as GCS lists it)."""
    entries = {p.relative_to(local_dir).as_posix(): {"size": p.stat().st_size, "md5": md5_base64(p)} for p in files}
    return (json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1, sort_keys=True) + "\n").encode()


def _md5_bytes(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _publish_local(local_dir: Path, dest: Path, manifest: bytes | None = None) -> dict[str, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Copy next to the destination, then rename: a reader never sees half a version.
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(local_dir, staging)
    if manifest is not None:
        # Written locally too, although the rename is what makes the version
        # visible here: readers check both back ends the same way.
        (staging / MANIFEST_FILE).write_bytes(manifest)
    try:
        staging.rename(dest)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        # Someone created the folder after the check: rename refuses a non-empty one.
        raise ExistsError(f"`{dest}` was written by someone else meanwhile: choose a new version.") from e
    return {p.relative_to(dest).as_posix(): md5_base64(p) for p in sorted(dest.rglob("*")) if p.is_file()}


def _upload_new(blob, source: Path | bytes, uri: str) -> None:
    """Uploads ``source`` (a file, or the bytes of one) to ``blob``, which must not exist yet.

    if_generation_match=0 makes GCS itself refuse an existing object, which closes
    the race between the exists() check in publish_dir and this write, and makes
    the upload safe to retry. A retry can meet that refusal for the attempt whose
    answer was lost on the way back although GCS had stored it: an object with the
    file's own MD5 is that attempt, anything else is someone else's.
    """
    from google.api_core import exceptions

    calls = {"if_generation_match": 0, "retry": _retry_if_generation_match(), "timeout": _timeout()}
    try:
        with _requests_for(uri):
            if isinstance(source, bytes):
                blob.upload_from_string(source, content_type="application/json", **calls)
            else:
                blob.upload_from_filename(str(source), **calls)
    except exceptions.PreconditionFailed as e:
        with _requests_for(uri):
            blob.reload(**_calls())
        if blob.md5_hash != (_md5_bytes(source) if isinstance(source, bytes) else md5_base64(source)):
            raise ExistsError(f"`{uri}` was written by someone else meanwhile: choose a new version.") from e


def _upload_verified(bucket, prefix: str, relative: str, source: Path | bytes, uri: str) -> str:
    """Uploads one new object and returns its MD5 as the service reads it back."""
    blob = _blob(bucket, _blob_name(prefix, relative))
    # gcp-storage-emulator ignores preconditions and overwrites, so against
    # it alone the refusal comes from the exists() check: keep both.
    _upload_new(blob, source, uri)
    # Read the checksum back from the service rather than trusting the
    # upload's own response: this is what a reader will get.
    with _requests_for(uri):
        blob.reload(**_calls())
    return blob.md5_hash


def _publish_gcs(files: list[Path], local_dir: Path, uri: str) -> dict[str, str]:
    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    checksums: dict[str, str] = {}
    try:
        for path in files:
            relative = path.relative_to(local_dir).as_posix()
            checksums[relative] = _upload_verified(bucket, prefix, relative, path, uri)
    except StorageError as e:
        if checksums:
            raise StorageError(
                f"{e} The upload stopped after {len(checksums)} of {len(files)} files: remove the "
                f"partial `{uri}` (gcloud storage rm -r {uri}) before trying this version again."
            ) from e
        raise
    return checksums


def _delete_partial(blob, uri: str) -> None:
    """Deletes an object a stopped upload of this version left, and only the generation that was listed.

    if_generation_match makes GCS refuse the delete where the object changed
    since it was listed: someone else is writing this version right now.
    """
    from google.api_core import exceptions

    try:
        with _requests_for(uri):
            blob.delete(if_generation_match=blob.generation, retry=_retry_if_generation_match(), timeout=_timeout())
    except exceptions.NotFound:
        pass  # gone already: a retry of a delete whose answer was lost
    except exceptions.PreconditionFailed as e:
        raise ExistsError(f"`{uri}` is being written by someone else right now: choose a new version.") from e


def _publish_gcs_version(files: list[Path], local_dir: Path, uri: str, manifest: bytes) -> dict[str, str]:
    """Uploads a version and makes it visible by writing its manifest last.

    What an earlier attempt stopped part-way left under ``uri`` (no manifest
    covers it) is finished, not refused: an object with the local file's size
    and MD5 is kept, any other is deleted, the rest is uploaded. Before the
    manifest goes up, the listing must show exactly the version's files:
    anything else means a second writer, and no manifest is written over it.
    """
    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    wanted = {p.relative_to(local_dir).as_posix(): (p.stat().st_size, md5_base64(p)) for p in files}
    checksums: dict[str, str] = {}
    try:
        leftovers = _list_blobs(bucket, uri, prefix)
        if MANIFEST_FILE in leftovers:
            # Completed by someone else since the check: a version with a manifest is never touched.
            raise ExistsError(f"`{uri}` already exists and kftune never overwrites an export: choose a new version.")
        for relative, blob in leftovers.items():
            if wanted.get(relative) == (blob.size, blob.md5_hash):
                checksums[relative] = blob.md5_hash
            else:
                _delete_partial(blob, uri)
        for path in files:
            relative = path.relative_to(local_dir).as_posix()
            if relative not in checksums:
                checksums[relative] = _upload_verified(bucket, prefix, relative, path, uri)
        stored = {relative: (blob.size, blob.md5_hash) for relative, blob in _list_blobs(bucket, uri, prefix).items()}
        if stored != wanted:
            changed = sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))
            raise ExistsError(f"`{uri}` was written by someone else meanwhile ({changed} changed): "
                              "choose a new version.")
        checksums[MANIFEST_FILE] = _upload_verified(bucket, prefix, MANIFEST_FILE, manifest, uri)
    except StorageError as e:
        raise StorageError(
            f"{e} The upload stopped after {len(checksums)} of {len(files)} files, before its {MANIFEST_FILE} was "
            f"confirmed: readers see no version at `{uri}` until it is; run the step again with the same version "
            "to finish it."
        ) from e
    return checksums


def publish_dir(local_dir: str | os.PathLike, uri: str, *, manifest: bool = False) -> dict[str, str]:
    """Copies a folder to ``uri`` without overwriting anything, and verifies it.

    With ``manifest``, the folder is published as a version: a MANIFEST.json
    (every file's path, size and MD5) is written last, in one write, and the
    version exists for readers only once it is there. A kill part-way then
    leaves objects no reader takes for a version; publishing the same version
    again finishes it. Without ``manifest``, any object under ``uri`` counts.

    Returns the MD5 (base64) of every file written (the manifest included),
    keyed by relative path, read back from the destination.

    Raises:
        ExistsError: ``uri`` already holds a version (with ``manifest`` on GCS:
            its manifest; otherwise any file); nothing is written.
        StorageError: The bucket is missing, access was denied, or a checksum
            read back differs from the local file's.
    """
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise InputError(f"`{local_dir}` holds no files: there is nothing to publish.")
    if manifest and (local_dir / MANIFEST_FILE).exists():
        raise InputError(f"`{local_dir}` holds a {MANIFEST_FILE} of its own, which the version's manifest would "
                         "replace: rename that file.")
    listing = _manifest(files, local_dir) if manifest else None
    if listing is not None and version_taken(uri):
        raise ExistsError(f"`{uri}` already exists and kftune never overwrites an export: choose a new version.")
    if listing is None:
        _refuse_existing(uri)
    if is_gcs(uri):
        checksums = (_publish_gcs_version(files, local_dir, uri, listing) if listing is not None
                     else _publish_gcs(files, local_dir, uri))
    else:
        checksums = _publish_local(local_dir, Path(uri), listing)
    expected = {p.relative_to(local_dir).as_posix(): md5_base64(p) for p in files}
    if listing is not None:
        expected[MANIFEST_FILE] = _md5_bytes(listing)
    if checksums != expected:
        bad = sorted(k for k in expected.keys() | checksums.keys() if checksums.get(k) != expected.get(k))
        raise StorageError(f"checksums of {bad} at `{uri}` differ from the local files: remove `{uri}` and upload again.")
    return checksums


def _not_a_version(uri: str) -> InputError:
    if not exists(uri):
        return InputError(f"`{uri}` holds no export: check the destination and the version.")
    return InputError(
        f"`{uri}` is not a complete export: it has no {MANIFEST_FILE} (an export stopped part-way, or the folder "
        "was not written by kftune): export it again with the same version to finish it, or give a complete version."
    )


def _parse_manifest(data: bytes, uri: str) -> dict[str, tuple[int, str]]:
    """(size, MD5) of every file a manifest lists, keyed by relative path."""
    try:
        document = json.loads(data)
        if document.get("format") != MANIFEST_FORMAT:
            raise ValueError(document.get("format"))
        return {str(relative): (int(entry["size"]), str(entry["md5"])) for relative, entry in document["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"`{uri}/{MANIFEST_FILE}` is not a kftune manifest ({_first_line(e)}): the version was "
                         "changed after it was exported; export the model again under a new version.") from e


def _stored_version(uri: str) -> tuple[dict[str, tuple[int, str]], dict[str, tuple[int, str | None]]]:
    """(what the manifest at ``uri`` lists, what is stored beside it), both as (size, MD5) by relative path."""
    from google.api_core import exceptions

    if not is_gcs(uri):
        root = Path(uri)
        if not (root / MANIFEST_FILE).is_file():
            raise _not_a_version(uri)
        listed = _parse_manifest((root / MANIFEST_FILE).read_bytes(), uri)
        stored = {p.relative_to(root).as_posix(): (p.stat().st_size, md5_base64(p))
                  for p in sorted(root.rglob("*")) if p.is_file()}
    else:
        bucket_name, prefix = parse_gcs(uri)
        bucket = _bucket(bucket_name)
        try:
            with _requests_for(uri):
                data = bucket.blob(_blob_name(prefix, MANIFEST_FILE)).download_as_bytes(**_calls())
        except exceptions.NotFound:
            raise _not_a_version(uri) from None
        listed = _parse_manifest(data, uri)
        stored = {relative: (blob.size, blob.md5_hash) for relative, blob in _list_blobs(bucket, uri, prefix).items()}
    stored.pop(MANIFEST_FILE, None)
    return listed, stored


def _differences(listed: dict, found: dict) -> str:
    missing = sorted(listed.keys() - found.keys())
    changed = sorted(k for k in listed.keys() & found.keys() if listed[k] != found[k])
    extra = sorted(found.keys() - listed.keys())
    parts = [f"{label} {names}" for label, names in (("missing", missing), ("size or MD5 differs", changed),
                                                      ("not in the manifest", extra)) if names]
    return "; ".join(parts)


def verify_version(uri: str) -> dict[str, str]:
    """Checks a version against its manifest and returns the MD5 of every file it lists.

    Nothing is downloaded: on GCS the sizes and MD5s come from the listing,
    locally from the files. A version is exactly its manifest's files.

    Raises:
        InputError: ``uri`` has no manifest (an export stopped part-way, or not
            kftune's), or its files differ from it (missing, changed, added).
    """
    return {relative: md5 for relative, (_, md5) in _verified(uri).items()}


def _verified(uri: str) -> dict[str, tuple[int, str]]:
    listed, stored = _stored_version(uri)
    if stored != listed:
        raise InputError(f"`{uri}` does not match its {MANIFEST_FILE} ({_differences(listed, stored)}): the version "
                         "was changed after it was exported; export the model again under a new version.")
    return listed


def fetch_version(uri: str, workdir: str | os.PathLike) -> Path:
    """Like :func:`fetch`, for a version: verified against its manifest before and after the download."""
    listed = _verified(uri)
    path = fetch(uri, workdir)
    got = {relative: ((path / relative).stat().st_size, md5_base64(path / relative))
           for relative in listed if safe_join(path, relative).is_file()}
    if got != listed:
        raise StorageError(f"the copy of `{uri}` read to {path} differs from its {MANIFEST_FILE} "
                           f"({_differences(listed, got)}): it changed while it was read; run the step again.")
    return path


class mirror:  # noqa: N801 - used as a context manager
    """A local folder standing for ``uri`` while a step works on it.

    Local paths are used in place. For ``gs://``, what is there is downloaded
    first; on a clean exit the files under ``write_back`` (a path relative to
    the folder, "" for all, None for none) are uploaded again, overwriting.
    Parallel trials each write back only their own trial folder. An empty
    ``uri`` stands for no location: a temporary folder, kept nowhere.
    """

    def __init__(self, uri: str, *, write_back: str | None = ""):
        self.uri, self.write_back = uri, write_back if uri else None
        self._tmp = None
        # MD5 of each file as it is in storage, so that a sync uploads only what changed.
        self._stored: dict[str, str | None] = {}

    def __enter__(self) -> Path:
        if not self.uri:
            import tempfile

            self._tmp = tempfile.TemporaryDirectory(prefix="kftune-")
            self.local = Path(self._tmp.name)
            return self.local
        if not is_gcs(self.uri):
            path = Path(self.uri)
            path.mkdir(parents=True, exist_ok=True)
            return path
        import tempfile

        bucket_name, prefix = parse_gcs(self.uri)
        self._bucket = bucket = _bucket(bucket_name)
        self._tmp = tempfile.TemporaryDirectory()
        self.local = Path(self._tmp.name, "mirror")
        self.local.mkdir()
        try:
            self._stored = _download(bucket, self.uri, prefix, self.local)
        except BaseException:
            self._tmp.cleanup()
            raise
        return self.local

    def sync(self) -> None:
        """Uploads the files under ``write_back`` now, e.g. after each training epoch.

        A pod killed mid-step loses nothing that was synced: the next attempt
        downloads it again on entry. Files go up in the order they were written
        (oldest first), so storage passes through the states the local folder
        did: a checkpoint's data before the pointer naming it. A kill part-way
        through a sync then leaves what a kill part-way through writing would
        have left on disk, which the writer (TensorFlow's CheckpointManager) is
        built to survive. Files unchanged since the last sync are not sent again,
        and files deleted locally since are deleted in storage too.
        """
        if self._tmp is None or self.write_back is None:
            return
        prefix = parse_gcs(self.uri)[1]
        root = safe_join(self.local, self.write_back)
        files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_mtime_ns, p.name))
        with _requests_for(self.uri):
            for path in files:
                relative = path.relative_to(self.local).as_posix()
                md5 = md5_base64(path)
                if self._stored.get(relative) == md5:
                    continue
                # Retried without a precondition on purpose: only this step writes
                # these files, so writing one twice leaves what writing it once does.
                _blob(self._bucket, _blob_name(prefix, relative)).upload_from_filename(
                    str(path), retry=_retry(), timeout=_timeout())
                self._stored[relative] = md5
            # Then what the step deleted since (TensorFlow's CheckpointManager keeps only the newest
            # checkpoint; a finished phase drops its backup): storage holds what the folder holds, not every
            # epoch's checkpoint forever. Last, so the newest checkpoint is stored before an older one goes.
            base = "" if self.write_back == "" else f"{Path(self.write_back).as_posix().strip('/')}/"
            present = {p.relative_to(self.local).as_posix() for p in files}
            for relative in sorted(r for r in self._stored if r.startswith(base) and r not in present):
                from google.api_core import exceptions

                try:
                    self._bucket.blob(_blob_name(prefix, relative)).delete(retry=_retry(), timeout=_timeout())
                except exceptions.NotFound:
                    pass  # gone already (a retried delete whose answer was lost)
                del self._stored[relative]

    def __exit__(self, kind, error, tb):
        if self._tmp is None:
            return False
        try:
            if error is None:
                self.sync()
        finally:
            self._tmp.cleanup()
        return False


# ---------------------------------------------------------------- a model base: numbered versions


def children(uri: str) -> list[str]:
    """The names of the folders directly under ``uri`` (on GCS: the prefixes one ``/`` below it), sorted.

    A missing location has none. On GCS a folder exists while any object under
    it does: this is what a model server polling ``uri`` sees.
    """
    if not is_gcs(uri):
        root = Path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    base = f"{prefix}/" if prefix else ""
    with _requests_for(uri):
        pages = bucket.list_blobs(prefix=base, delimiter="/", **_calls()).pages
        names = {p[len(base):].rstrip("/") for page in pages for p in page.prefixes}
    return sorted(names)


def create_new(uri: str, data: bytes) -> bool:
    """Stores ``data`` at ``uri`` only where nothing is: True if it is now there, False if someone else's is.

    The one atomic "claim" kftune needs on both back ends: locally an
    exclusive create (``O_EXCL``, atomic on POSIX file systems and NFSv3+), on
    GCS an upload with ``if_generation_match=0``, which GCS refuses when the
    object exists. A retry that meets its own earlier write (same bytes) counts
    as created, so a write whose answer was lost is not taken for a rival's.
    """
    if not is_gcs(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return path.read_bytes() == data
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    bucket_name, name = parse_gcs(uri)
    blob = _blob(_bucket(bucket_name), name)
    existing = read_bytes(uri)  # the emulator ignores preconditions: this check is what refuses there
    if existing is not None:
        return existing == data
    try:
        _upload_new(blob, data, uri)
    except ExistsError:
        return False
    return read_bytes(uri) == data


def promote_version(staging_uri: str, uri: str, *, last: tuple[str, ...] = ()) -> dict[str, str]:
    """Copies a complete GCS version from ``staging_uri`` to ``uri``, inside GCS, its manifest last.

    GCS has no rename: objects appear one by one. The upload from the pod (the
    slow part, minutes for a large model) goes to a staging prefix no server
    polls; this copies it into place server-side (GCS's rewrite: no bytes
    through the pod), so the window in which ``uri`` is partly there is the
    copy's seconds, not the upload's minutes. Within it, the files in ``last``
    come after every other file and before the manifest: TF Serving starts
    loading a version by reading ``saved_model.pb``, so once that is visible,
    every variable it names is too. What a stopped promotion left under ``uri``
    is finished: objects that match the manifest are kept, others deleted.

    Returns the MD5 of every file of the version (the manifest included), read back.

    Raises:
        ExistsError: ``uri`` already holds a complete version, or changed while this copied.
    """
    from google.api_core import exceptions

    listed = _verified(staging_uri)
    bucket_name, prefix = parse_gcs(uri)
    _, staging_prefix = parse_gcs(staging_uri)
    bucket = _bucket(bucket_name)
    leftovers = _list_blobs(bucket, uri, prefix)
    if MANIFEST_FILE in leftovers:
        raise ExistsError(f"`{uri}` already exists and kftune never overwrites an export: choose a new version.")
    checksums: dict[str, str] = {}
    for relative, blob in leftovers.items():
        if listed.get(relative) == (blob.size, blob.md5_hash):
            checksums[relative] = blob.md5_hash
        else:
            _delete_partial(blob, uri)
    order = sorted(listed, key=lambda relative: (relative in last, relative)) + [MANIFEST_FILE]
    for relative in order:
        if relative in checksums:
            continue
        source = bucket.blob(_blob_name(staging_prefix, relative))
        target_name = _blob_name(prefix, relative)
        try:
            with _requests_for(uri):
                copied = bucket.copy_blob(source, bucket, target_name, if_generation_match=0,
                                          retry=_retry_if_generation_match(), timeout=_timeout())
        except exceptions.PreconditionFailed:
            with _requests_for(uri):
                copied = bucket.get_blob(target_name, **_calls())
        with _requests_for(uri):
            reference = bucket.get_blob(source.name, **_calls())
        if copied is None or reference is None or copied.md5_hash != reference.md5_hash:
            raise ExistsError(f"`{uri}/{relative}` was written by someone else meanwhile: choose a new version.")
        checksums[relative] = copied.md5_hash
    verified = verify_version(uri)
    checksums = {relative: checksums[relative] for relative in [*sorted(verified), MANIFEST_FILE]}
    delete_tree(staging_uri)
    return checksums


def delete_tree(uri: str) -> None:
    """Removes everything under ``uri`` (staging kftune itself wrote); what is already gone is no error."""
    if not is_gcs(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    from google.api_core import exceptions

    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    for blob in _list_blobs(bucket, uri, prefix).values():
        with contextlib.suppress(exceptions.NotFound), _requests_for(uri):
            blob.delete(**_calls())


def md5_base64_of(uri: str) -> str:
    """The MD5 (base64) of the file or object at ``uri``, as GCS lists it."""
    if not is_gcs(uri):
        return md5_base64(uri)
    bucket_name, name = parse_gcs(uri)
    with _requests_for(uri):
        blob = _bucket(bucket_name).get_blob(name, **_calls())
    if blob is None:
        raise InputError(f"`{uri}` does not exist.")
    return blob.md5_hash
