"""Storage: one contract for local folders and GCS (a real emulator), and the refusals users meet."""

import http.client
import http.server
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultproxy import ProxyHandler

from kftune import storage
from kftune.errors import ExistsError, InputError, StorageError


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    """The same place on each back end: a local folder, or a prefix in a fresh emulator bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"gs://{request.getfixturevalue('bucket')}/store"


def _folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "a.txt").write_text("alpha")
    (path / "sub" / "b.bin").write_bytes(bytes(range(256)) * 40)
    return path


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the contract, on both back ends


def test_publish_then_list_exists_and_fetch(root, tmp_path):
    source = _folder(tmp_path / "source")
    uri = f"{root}/v1"
    assert not storage.exists(uri)

    checksums = storage.publish_dir(source, uri)

    assert checksums == {"a.txt": storage.md5_base64(source / "a.txt"),
                         "sub/b.bin": storage.md5_base64(source / "sub" / "b.bin")}
    assert storage.exists(uri) and storage.exists(f"{uri}/a.txt") and not storage.exists(f"{root}/v2")
    assert list(storage.list_files(uri)) == ["a.txt", "sub/b.bin"]
    fetched = storage.fetch(uri, tmp_path / "work")
    assert _contents(fetched) == _contents(source)
    single = storage.fetch(f"{uri}/sub/b.bin", tmp_path / "work-file")
    assert single.read_bytes() == (source / "sub" / "b.bin").read_bytes()


def test_publish_refuses_an_existing_version_and_leaves_it_alone(root, tmp_path):
    first = _folder(tmp_path / "first")
    second = tmp_path / "second"
    second.mkdir()
    (second / "a.txt").write_text("would overwrite")
    storage.publish_dir(first, f"{root}/v1")

    with pytest.raises(ExistsError, match="v1` already exists and kftune never overwrites"):
        storage.publish_dir(second, f"{root}/v1")

    assert _contents(storage.fetch(f"{root}/v1", tmp_path / "check")) == _contents(first)


def test_mirror_round_trip_writes_back_only_what_it_is_told(root, tmp_path):
    with storage.mirror(root) as folder:
        (folder / "trial-1").mkdir()
        (folder / "trial-1" / "result.json").write_text('{"score": 1}')
        (folder / "oracle.json").write_text("{}")
    with storage.mirror(root, write_back="trial-2") as folder:
        assert (folder / "trial-1" / "result.json").read_text() == '{"score": 1}'
        (folder / "trial-2").mkdir()
        (folder / "trial-2" / "result.json").write_text('{"score": 2}')
        (folder / "oracle.json").write_text('{"changed": true}')
    with pytest.raises(RuntimeError, match="trial failed"), storage.mirror(root) as folder:
        (folder / "oracle.json").write_text('{"half-written": true}')
        raise RuntimeError("trial failed")

    files = _contents(storage.fetch(root, tmp_path / "check"))
    assert files == {"oracle.json": b"{}" if storage.is_gcs(root) else b'{"half-written": true}',
                     "trial-1/result.json": b'{"score": 1}', "trial-2/result.json": b'{"score": 2}'}


def test_mirror_sync_uploads_before_the_step_ends(root, tmp_path):
    """What was synced after an epoch is in storage even if the pod is killed before the step ends."""
    step = storage.mirror(root, write_back="trial-3")
    with step as folder:
        (folder / "trial-3").mkdir()
        (folder / "trial-3" / "epoch-1.ckpt").write_text("weights after epoch 1")
        (folder / "oracle.json").write_text("not this trial's to write")
        step.sync()
        seen_mid_step = _contents(storage.fetch(root, tmp_path / "mid-step"))
    assert seen_mid_step["trial-3/epoch-1.ckpt"] == b"weights after epoch 1"
    if storage.is_gcs(root):
        assert "oracle.json" not in _contents(storage.fetch(root, tmp_path / "after"))


def test_fetch_of_nothing_says_so(root, tmp_path):
    with pytest.raises(InputError, match="does not exist|holds no objects"):
        storage.fetch(f"{root}/missing", tmp_path / "work")


# ---------------------------------------------------------------- GCS only


def test_gcs_upload_is_verified_against_checksums_read_back(bucket, tmp_path):
    from google.cloud import storage as gcs

    source = _folder(tmp_path / "source")
    checksums = storage.publish_dir(source, f"gs://{bucket}/models/v1")

    blobs = {b.name: b.md5_hash for b in storage._client().list_blobs(bucket)}
    assert blobs == {f"models/v1/{name}": md5 for name, md5 in checksums.items()}
    downloaded = gcs.Blob("models/v1/sub/b.bin", storage._client().bucket(bucket)).download_as_bytes()
    assert downloaded == (source / "sub" / "b.bin").read_bytes()


def test_missing_bucket_is_a_clear_storage_error(gcs_emulator, tmp_path):
    name = f"kftune-missing-{uuid.uuid4().hex[:8]}"
    source = _folder(tmp_path / "source")
    for attempt in (lambda: storage.exists(f"gs://{name}/v1"), lambda: storage.fetch(f"gs://{name}/data", tmp_path),
                    lambda: storage.publish_dir(source, f"gs://{name}/models/v1")):
        with pytest.raises(StorageError, match=f"GCS bucket `{name}` does not exist: create it "
                                               rf"\(gcloud storage buckets create gs://{name}\)"):
            attempt()


def test_uri_without_bucket_is_an_input_error():
    with pytest.raises(InputError, match="names no bucket: write it as gs://BUCKET/PATH"):
        storage.exists("gs:///models")


# ---------------------------------------------------------------- denied access


class _Gateway(http.server.ThreadingHTTPServer):
    """A loopback HTTP server in front of the emulator, for what the emulator cannot do.

    It answers 403, with the JSON error body GCS sends, for the requests
    ``denied(method, path, body)`` picks (the emulator has no permissions), and
    passes the emulator's answers to the rest through ``edit(path, body)`` (the
    emulator refuses some object names GCS accepts). The client under test
    makes real HTTP requests either way.
    """

    def __init__(self, upstream: str, denied, edit=None):
        self.upstream, self.denied, self.edit = urlsplit(upstream), denied, edit
        super().__init__(("127.0.0.1", 0), _GatewayHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _GatewayHandler(ProxyHandler):
    def _any(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.denied(self.command, self.path, body):
            return self._error(403, "forbidden",
                               "kftune-test@example.iam.gserviceaccount.com does not have storage.objects.create access.")
        status, headers, answer = self._forward_as_is(body)
        if self.server.edit is not None:
            answer = self.server.edit(self.path, answer)
        self._reply(status, headers, answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any


@pytest.fixture
def gateway(gcs_emulator, monkeypatch):
    """Points the client at a _Gateway for the rest of the test."""
    servers = []

    def start(denied, edit=None):
        server = _Gateway(gcs_emulator, denied, edit)
        servers.append(server)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        storage._client.cache_clear()
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    storage._client.cache_clear()


def test_denied_access_is_a_clear_storage_error(bucket, gateway, tmp_path):
    gateway(lambda method, path, body: True)
    for attempt in (lambda: storage.exists(f"gs://{bucket}/v1"), lambda: storage.fetch(f"gs://{bucket}/d", tmp_path),
                    lambda: list(storage.list_files(f"gs://{bucket}/d"))):
        with pytest.raises(StorageError, match=f"access to `gs://{bucket}` was denied: give the pipeline's "
                                               "service account roles/storage.objectAdmin"):
            attempt()


def test_denied_write_stops_the_upload_and_says_what_to_do(bucket, gateway, tmp_path):
    source = _folder(tmp_path / "source")
    # A reader's role: listing and downloads pass, every write is refused.
    gateway(lambda method, path, body: method != "GET")

    with pytest.raises(StorageError, match=f"access to `gs://{bucket}/models/v1` was denied"):
        storage.publish_dir(source, f"gs://{bucket}/models/v1")
    with pytest.raises(StorageError, match="was denied"), storage.mirror(f"gs://{bucket}/state") as folder:
        (folder / "oracle.json").write_text("{}")

    assert not storage.exists(f"gs://{bucket}/models/v1")


def test_denied_write_after_some_files_names_the_partial_version(bucket, gateway, tmp_path):
    source = _folder(tmp_path / "source")
    # Files go up in name order: a.txt passes, sub/b.bin (named in the upload's body) is refused.
    gateway(lambda method, path, body: method != "GET" and b"sub/b.bin" in body)

    with pytest.raises(StorageError, match=rf"stopped after 1 of 2 files: remove the partial `gs://{bucket}/v1` "
                                           rf"\(gcloud storage rm -r gs://{bucket}/v1\)"):
        storage.publish_dir(source, f"gs://{bucket}/v1")


def test_missing_credentials_are_a_clear_storage_error(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    storage._client.cache_clear()
    try:
        with pytest.raises(StorageError, match="no Google Cloud credentials to reach GCS.*GOOGLE_APPLICATION_CREDENTIALS"):
            storage.exists("gs://some-bucket/models")
    finally:
        storage._client.cache_clear()


def test_object_names_escaping_the_target_folder_are_refused(bucket, gateway, tmp_path):
    storage._client().bucket(bucket).blob("data/inside.txt").upload_from_string("inside")
    # GCS accepts the object name data/../../escape.txt (the emulator does not): list it as that.
    gateway(lambda method, path, body: False,
            edit=lambda path, body: body.replace(b'"data/inside.txt"', b'"data/../../escape.txt"'))
    assert list(storage.list_files(f"gs://{bucket}/data")) == ["../../escape.txt"]
    work = tmp_path / "deep" / "work"

    with pytest.raises(InputError, match=r"refusing to download `\.\./\.\./escape\.txt`: it points outside"):
        storage.fetch(f"gs://{bucket}/data", work)
    with pytest.raises(InputError, match="points outside"), storage.mirror(f"gs://{bucket}/data"):
        pass
    with pytest.raises(InputError, match="points outside"):
        storage.fetch(f"gs://{bucket}/data/../../../escape.txt", work)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_object_roles_without_bucket_metadata_access_are_enough(bucket, gateway, tmp_path):
    # roles/storage.objectAdmin, the role the denied message asks for, cannot GET the bucket itself.
    gateway(lambda method, path, body: urlsplit(path).path == f"/storage/v1/b/{bucket}")
    from google.api_core.exceptions import Forbidden

    with pytest.raises(Forbidden):
        storage._client().get_bucket(bucket)

    checksums = storage.publish_dir(_folder(tmp_path / "source"), f"gs://{bucket}/models/v1")

    assert sorted(checksums) == ["a.txt", "sub/b.bin"]
