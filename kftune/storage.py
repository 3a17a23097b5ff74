"""Reading and writing local paths and ``gs://`` URIs the same way.

Datasets, backbone weights and exported models may sit on a laptop's disk or in
Google Cloud Storage. Everything that takes a location takes either, and goes
through here, so that the GCS client's retries and the error messages a user
sees are the same everywhere. Setting ``STORAGE_EMULATOR_HOST`` points the
client at an emulator (the tests do).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from kftune.errors import ExistsError, InputError, StorageError

GCS_SCHEME = "gs://"


def is_gcs(uri: str) -> bool:
    return str(uri).startswith(GCS_SCHEME)


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


def _denied(uri: str) -> StorageError:
    return StorageError(
        f"access to `{uri}` was denied: give the pipeline's service account "
        "roles/storage.objectAdmin on the bucket (Workload Identity), or mount a key."
    )


@contextlib.contextmanager
def _requests_for(uri: str):
    """Turns the client's refusals into StorageErrors that name ``uri`` and say what to do."""
    from google.api_core import exceptions

    try:
        yield
    except exceptions.Forbidden as e:
        raise _denied(uri) from e
    except exceptions.Unauthorized as e:
        raise StorageError(
            f"GCS rejected the credentials used for `{uri}` ({e.message}): refresh or replace them."
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
            next(iter(bucket.list_blobs(max_results=1)), None)
        except exceptions.NotFound as e:
            raise StorageError(
                f"GCS bucket `{name}` does not exist: create it "
                f"(gcloud storage buckets create gs://{name}) or fix the URI."
            ) from e
    return bucket


def _blob_name(prefix: str, relative: str) -> str:
    return f"{prefix}/{relative}" if prefix else relative


def _safe_join(root: Path, relative: str) -> Path:
    """Joins ``relative`` under ``root``, refusing names that would escape it.

    Object names are whatever whoever wrote the bucket chose; ``a/../../x`` is
    a valid one, and must not become a path outside the download folder.
    """
    target = (root / relative).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise InputError(f"refusing to download `{relative}`: it points outside {root}. Rename the object.")
    return target


def _list_names(bucket, uri: str, prefix: str) -> list[str]:
    """Object names under ``prefix`` (as a folder), relative to it, sorted."""
    base = f"{prefix}/" if prefix else ""
    with _requests_for(uri):
        names = sorted(b.name for b in bucket.list_blobs(prefix=base))
    return [name[len(base) :] for name in names if not name.endswith("/")]


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
            if prefix and bucket.blob(prefix).exists():
                return True
            base = f"{prefix}/" if prefix else ""
            return any(True for _ in bucket.list_blobs(prefix=base, max_results=1))
    return Path(uri).exists()


def _download(bucket, uri: str, prefix: str, dest: Path) -> int:
    """Downloads every object under ``prefix`` into ``dest``, keeping relative paths.

    Every name is checked before anything is written. Returns how many objects there were.
    """
    names = _list_names(bucket, uri, prefix)
    targets = [_safe_join(dest, relative) for relative in names]
    for relative, target in zip(names, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _requests_for(uri):
            bucket.blob(_blob_name(prefix, relative)).download_to_filename(str(target))
    return len(names)


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
    dest = _safe_join(Path(workdir), f"{bucket_name}/{prefix}")
    with _requests_for(uri):
        blob = bucket.blob(prefix) if prefix else None
        if blob is not None and blob.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(dest))
            return dest
    if not _download(bucket, uri, prefix, dest):
        raise InputError(f"`{uri}` holds no objects: check the bucket and prefix.")
    return dest


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


def _publish_local(local_dir: Path, dest: Path) -> dict[str, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Copy next to the destination, then rename: a reader never sees half a version.
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(local_dir, staging)
    try:
        staging.rename(dest)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        # Someone created the folder after the check: rename refuses a non-empty one.
        raise ExistsError(f"`{dest}` was written by someone else meanwhile: choose a new version.") from e
    return {p.relative_to(dest).as_posix(): md5_base64(p) for p in sorted(dest.rglob("*")) if p.is_file()}


def _publish_gcs(files: list[Path], local_dir: Path, uri: str) -> dict[str, str]:
    from google.api_core import exceptions

    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    checksums: dict[str, str] = {}
    try:
        with _requests_for(uri):
            for path in files:
                relative = path.relative_to(local_dir).as_posix()
                blob = bucket.blob(_blob_name(prefix, relative))
                # if_generation_match=0 makes GCS itself refuse an existing object,
                # which closes the race between the exists() check in publish_dir
                # and this write. gcp-storage-emulator ignores preconditions and
                # overwrites, so against it (in the tests) the refusal comes from
                # that exists() check instead: keep both.
                blob.upload_from_filename(str(path), if_generation_match=0)
                # Read the checksum back from the service rather than trusting the
                # upload's own response: this is what a reader will get.
                blob.reload()
                checksums[relative] = blob.md5_hash
    except exceptions.PreconditionFailed as e:
        raise ExistsError(f"`{uri}` was written by someone else meanwhile: choose a new version.") from e
    except StorageError as e:
        if checksums:
            raise StorageError(
                f"{e} The upload stopped after {len(checksums)} of {len(files)} files: remove the "
                f"partial `{uri}` (gcloud storage rm -r {uri}) before trying this version again."
            ) from e
        raise
    return checksums


def publish_dir(local_dir: str | os.PathLike, uri: str) -> dict[str, str]:
    """Copies a folder to ``uri`` without overwriting anything, and verifies it.

    Returns the MD5 (base64) of every file written, keyed by relative path,
    read back from the destination.

    Raises:
        ExistsError: ``uri`` already holds files; nothing is written.
        StorageError: The bucket is missing, access was denied, or a checksum
            read back differs from the local file's.
    """
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise InputError(f"`{local_dir}` holds no files: there is nothing to publish.")
    _refuse_existing(uri)
    if is_gcs(uri):
        checksums = _publish_gcs(files, local_dir, uri)
    else:
        checksums = _publish_local(local_dir, Path(uri))
    expected = {p.relative_to(local_dir).as_posix(): md5_base64(p) for p in files}
    if checksums != expected:
        bad = sorted(k for k in expected.keys() | checksums.keys() if checksums.get(k) != expected.get(k))
        raise StorageError(f"checksums of {bad} at `{uri}` differ from the local files: remove `{uri}` and upload again.")
    return checksums


class mirror:  # noqa: N801 - used as a context manager
    """A local folder standing for ``uri`` while a step works on it.

    Local paths are used in place. For ``gs://``, what is there is downloaded
    first; on a clean exit the files under ``write_back`` (a path relative to
    the folder, "" for all, None for none) are uploaded again, overwriting.
    Parallel trials each write back only their own trial folder.
    """

    def __init__(self, uri: str, *, write_back: str | None = ""):
        self.uri, self.write_back = uri, write_back
        self._tmp = None

    def __enter__(self) -> Path:
        if not is_gcs(self.uri):
            path = Path(self.uri)
            path.mkdir(parents=True, exist_ok=True)
            return path
        import tempfile

        bucket_name, prefix = parse_gcs(self.uri)
        bucket = _bucket(bucket_name)
        self._tmp = tempfile.TemporaryDirectory()
        self.local = Path(self._tmp.name, "mirror")
        self.local.mkdir()
        try:
            _download(bucket, self.uri, prefix, self.local)
        except BaseException:
            self._tmp.cleanup()
            raise
        return self.local

    def sync(self) -> None:
        """Uploads the files under ``write_back`` now, e.g. after each training epoch.

        A pod killed mid-step loses nothing that was synced: the next attempt
        downloads it again on entry.
        """
        if self._tmp is None or self.write_back is None:
            return
        bucket_name, prefix = parse_gcs(self.uri)
        bucket = _bucket(bucket_name)
        root = _safe_join(self.local, self.write_back)
        with _requests_for(self.uri):
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                relative = path.relative_to(self.local).as_posix()
                bucket.blob(_blob_name(prefix, relative)).upload_from_filename(str(path))

    def __exit__(self, kind, error, tb):
        if self._tmp is None:
            return False
        try:
            if error is None:
                self.sync()
        finally:
            self._tmp.cleanup()
        return False
