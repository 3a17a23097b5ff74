"""Reading and writing local paths and ``gs://`` URIs the same way.

Datasets, backbone weights and exported models may sit on a laptop's disk or in
Google Cloud Storage. Everything that takes a location takes either, and goes
through here, so that the GCS client's retries and the error messages a user
sees are the same everywhere. Setting ``STORAGE_EMULATOR_HOST`` points the
client at an emulator (the tests do).
"""

from __future__ import annotations

import base64
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
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="kftune-emulator", credentials=AnonymousCredentials())
    return storage.Client()


def _bucket(name: str):
    from google.api_core import exceptions

    bucket = _client().bucket(name)
    try:
        if not bucket.exists():
            raise StorageError(
                f"GCS bucket `{name}` does not exist: create it "
                f"(gcloud storage buckets create gs://{name}) or fix the URI."
            )
    except exceptions.Forbidden as e:
        raise _denied(f"gs://{name}") from e
    return bucket


def _denied(uri: str) -> StorageError:
    return StorageError(
        f"access to `{uri}` was denied: give the pipeline's service account "
        "roles/storage.objectAdmin on the bucket (Workload Identity), or mount a key."
    )


def _safe_join(root: Path, relative: str) -> Path:
    """Joins ``relative`` under ``root``, refusing names that would escape it."""
    target = (root / relative).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise InputError(f"refusing `{relative}`: it points outside {root}.")
    return target


def list_files(uri: str) -> Iterator[str]:
    """Yields the path of every file under ``uri``, relative to it, sorted."""
    if is_gcs(uri):
        from google.api_core import exceptions

        bucket_name, prefix = parse_gcs(uri)
        bucket = _bucket(bucket_name)
        base = f"{prefix}/" if prefix else ""
        try:
            names = sorted(b.name for b in bucket.list_blobs(prefix=base))
        except exceptions.Forbidden as e:
            raise _denied(uri) from e
        for name in names:
            if not name.endswith("/"):
                yield name[len(base) :]
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
        if prefix and bucket.blob(prefix).exists():
            return True
        return any(True for _ in bucket.list_blobs(prefix=f"{prefix}/", max_results=1))
    return Path(uri).exists()


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
    from google.api_core import exceptions

    bucket_name, prefix = parse_gcs(uri)
    bucket = _bucket(bucket_name)
    dest = Path(workdir) / bucket_name / prefix
    try:
        blob = bucket.blob(prefix) if prefix else None
        if blob is not None and blob.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(dest))
            return dest
        relatives = list(list_files(uri))
        if not relatives:
            raise InputError(f"`{uri}` holds no objects: check the bucket and prefix.")
        for relative in relatives:
            target = _safe_join(dest, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            bucket.blob(f"{prefix}/{relative}" if prefix else relative).download_to_filename(
                str(target)
            )
    except exceptions.Forbidden as e:
        raise _denied(uri) from e
    return dest


def md5_base64(path: str | os.PathLike) -> str:
    """The MD5 of a file as GCS reports it (base64 of the digest)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def publish_dir(local_dir: str | os.PathLike, uri: str) -> dict[str, str]:
    """Copies a folder to ``uri`` without overwriting anything, and verifies it.

    Returns the MD5 (base64) of every file written, keyed by relative path,
    read back from the destination.

    Raises:
        ExistsError: ``uri`` already holds files; nothing is written.
    """
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if exists(uri):
        raise ExistsError(
            f"`{uri}` already exists and kftune never overwrites an export: "
            "choose a new version or remove it yourself."
        )
    if not is_gcs(uri):
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy next to the destination, then rename: a reader never sees half a version.
        staging = dest.with_name(f".{dest.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(local_dir, staging)
        staging.rename(dest)
        checksums = {p.relative_to(dest).as_posix(): md5_base64(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    else:
        from google.api_core import exceptions

        bucket_name, prefix = parse_gcs(uri)
        bucket = _bucket(bucket_name)
        checksums = {}
        try:
            for path in files:
                relative = path.relative_to(local_dir).as_posix()
                blob = bucket.blob(f"{prefix}/{relative}" if prefix else relative)
                # if_generation_match=0 makes GCS itself refuse an existing object,
                # which closes the race between the exists() check above and this
                # write. (gcp-storage-emulator ignores preconditions, so the tests
                # see the refusal from the exists() check instead.)
                blob.upload_from_filename(str(path), if_generation_match=0)
                blob.reload()
                checksums[relative] = blob.md5_hash
        except exceptions.PreconditionFailed as e:
            raise ExistsError(f"`{uri}` was written by someone else meanwhile: choose a new version.") from e
        except exceptions.Forbidden as e:
            raise _denied(uri) from e
    expected = {p.relative_to(local_dir).as_posix(): md5_base64(p) for p in files}
    if checksums != expected:
        bad = sorted(k for k in expected if checksums.get(k) != expected[k])
        raise StorageError(f"checksums of {bad} at `{uri}` differ from the local files: upload again.")
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

        self._tmp = tempfile.TemporaryDirectory()
        self.local = Path(self._tmp.name, "mirror")
        self.local.mkdir()
        bucket_name, prefix = parse_gcs(self.uri)
        bucket = _bucket(bucket_name)
        for relative in list_files(self.uri):
            target = _safe_join(self.local, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            bucket.blob(f"{prefix}/{relative}" if prefix else relative).download_to_filename(str(target))
        return self.local

    def __exit__(self, kind, error, tb):
        if self._tmp is None:
            return False
        try:
            if error is None and self.write_back is not None:
                bucket_name, prefix = parse_gcs(self.uri)
                bucket = _bucket(bucket_name)
                root = self.local / self.write_back
                for path in sorted(p for p in root.rglob("*") if p.is_file()):
                    relative = path.relative_to(self.local).as_posix()
                    bucket.blob(f"{prefix}/{relative}" if prefix else relative).upload_from_filename(str(path))
        finally:
            self._tmp.cleanup()
        return False
