"""Storage: one contract for local folders and GCS (a real emulator), and the refusals users meet."""

import http.client
import http.server
import os
import shutil
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


def test_a_version_stopped_part_way_is_no_version_and_the_same_version_finishes_later(bucket, gateway, tmp_path):
    source = _folder(tmp_path / "source")
    uri = f"gs://{bucket}/v1"
    gateway(lambda method, path, body: method != "GET" and b"sub/b.bin" in body)

    with pytest.raises(StorageError) as stopped:
        storage.publish_dir(source, uri, manifest=True)
    assert str(stopped.value).endswith(
        f"The upload stopped after 1 of 2 files, before its MANIFEST.json was confirmed: readers see no version at "
        f"`{uri}` until it is; run the step again with the same version to finish it.")
    assert storage.exists(uri) and not storage.version_taken(uri)

    gateway(lambda method, path, body: False)  # access restored
    checksums = storage.publish_dir(source, uri, manifest=True)
    assert storage.verify_version(uri) == {k: v for k, v in checksums.items() if k != storage.MANIFEST_FILE}


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


# ---------------------------------------------------------------- versions: complete or invisible


def _stored(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """What the emulator holds under ``prefix``, read past any proxy."""
    return {b.name[len(prefix) + 1:]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=f"{prefix}/")}


def test_a_version_is_published_with_its_manifest_last_and_verifies(root, tmp_path):
    import json

    source = _folder(tmp_path / "source")
    uri = f"{root}/v1"

    checksums = storage.publish_dir(source, uri, manifest=True)

    assert sorted(checksums) == [storage.MANIFEST_FILE, "a.txt", "sub/b.bin"]
    assert list(storage.list_files(uri)) == [storage.MANIFEST_FILE, "a.txt", "sub/b.bin"]
    manifest = json.loads((storage.fetch(f"{uri}/{storage.MANIFEST_FILE}", tmp_path / "m")).read_text())
    assert manifest == {"format": storage.MANIFEST_FORMAT, "files": {
        "a.txt": {"size": 5, "md5": storage.md5_base64(source / "a.txt")},
        "sub/b.bin": {"size": 10240, "md5": storage.md5_base64(source / "sub" / "b.bin")}}}
    assert storage.has_manifest(uri) and storage.version_taken(uri)
    assert storage.verify_version(uri) == {k: v for k, v in checksums.items() if k != storage.MANIFEST_FILE}
    fetched = storage.fetch_version(uri, tmp_path / "work")
    assert {k: v for k, v in _contents(fetched).items() if k != storage.MANIFEST_FILE} == _contents(source)


def test_a_version_whose_files_changed_after_publishing_is_refused_by_readers(root, tmp_path):
    uri = f"{root}/v1"
    storage.publish_dir(_folder(tmp_path / "source"), uri, manifest=True)
    with storage.mirror(uri) as folder:  # someone edits the version in place
        (folder / "a.txt").write_text("edited")
        (folder / "added.txt").write_text("new")

    with pytest.raises(InputError) as refused:
        storage.verify_version(uri)
    assert str(refused.value) == (
        f"`{uri}` does not match its MANIFEST.json (size or MD5 differs ['a.txt']; not in the manifest "
        "['added.txt']): the version was changed after it was exported; export the model again under a new version.")
    with pytest.raises(InputError, match="does not match its MANIFEST.json"):
        storage.fetch_version(uri, tmp_path / "work")


def test_a_prefix_without_a_manifest_is_no_version_and_readers_say_so_in_one_line(bucket, stored_gcs, tmp_path):
    uri = f"gs://{bucket}/models/v1"
    stored_gcs.bucket(bucket).blob("models/v1/model.keras").upload_from_string(b"half an export")

    assert storage.exists(uri) and not storage.has_manifest(uri) and not storage.version_taken(uri)
    for read in (lambda: storage.verify_version(uri), lambda: storage.fetch_version(uri, tmp_path / "work")):
        with pytest.raises(InputError) as refused:
            read()
        assert str(refused.value) == (
            f"`{uri}` is not a complete export: it has no MANIFEST.json (an export stopped part-way, or the folder "
            "was not written by kftune): export it again with the same version to finish it, or give a complete "
            "version.")
    with pytest.raises(InputError, match=f"`gs://{bucket}/models/v2` holds no export: check the destination"):
        storage.verify_version(f"gs://{bucket}/models/v2")


def test_publishing_a_partial_version_again_finishes_it(bucket, stored_gcs, fault_proxy, tmp_path):
    """What a stopped upload left is kept where it is the same file, replaced where not, and the rest uploaded."""
    source = _folder(tmp_path / "source")
    (source / "z.txt").write_text("last")
    partial = stored_gcs.bucket(bucket)
    partial.blob("v1/a.txt").upload_from_string(b"alpha")  # as the local file: kept
    partial.blob("v1/sub/b.bin").upload_from_string(b"cut short")  # differs: replaced
    partial.blob("v1/stale.tmp").upload_from_string(b"not in this version")  # removed
    proxy = fault_proxy({"api": ["ok"], "upload": ["ok"], "download": ["ok"]})

    checksums = storage.publish_dir(source, f"gs://{bucket}/v1", manifest=True)

    assert _stored(stored_gcs, bucket, "v1").keys() == {"MANIFEST.json", "a.txt", "sub/b.bin", "z.txt"}
    assert {k: v for k, v in _stored(stored_gcs, bucket, "v1").items() if k != "MANIFEST.json"} == _contents(source)
    assert proxy.uploaded == ["v1/sub/b.bin", "v1/z.txt", "v1/MANIFEST.json"]
    deletes = [urlsplit(path) for _, method, path, _, _ in proxy.log if method == "DELETE"]
    assert sorted(d.path.rsplit("/", 1)[1] for d in deletes) == ["v1%2Fstale.tmp", "v1%2Fsub%2Fb.bin"]
    # Each delete names the generation that was listed: GCS refuses it if someone rewrote the object since.
    assert all("ifGenerationMatch=" in d.query for d in deletes)
    assert storage.verify_version(f"gs://{bucket}/v1") == {k: v for k, v in checksums.items() if k != "MANIFEST.json"}


def test_a_version_with_its_manifest_is_never_touched_even_when_files_are_missing(bucket, stored_gcs, tmp_path):
    source = _folder(tmp_path / "source")
    uri = f"gs://{bucket}/v1"
    storage.publish_dir(source, uri, manifest=True)
    stored_gcs.bucket(bucket).blob("v1/sub/b.bin").delete()  # damaged by someone: still not kftune's to replace
    before = {b.name: b.generation for b in stored_gcs.list_blobs(bucket)}

    with pytest.raises(ExistsError, match=f"`{uri}` already exists and kftune never overwrites an export"):
        storage.publish_dir(source, uri, manifest=True)

    assert {b.name: b.generation for b in stored_gcs.list_blobs(bucket)} == before
    with pytest.raises(InputError, match=r"does not match its MANIFEST.json \(missing \['sub/b.bin'\]\)"):
        storage.verify_version(uri)


# ---------------------------------------------------------------- faults on realistic sizes, through tests/faultproxy.py

BIG = 12 * 1024 * 1024  # over 8 MiB: google-cloud-storage sends it in a resumable upload session
ALL_OK = {"api": ["ok"], "upload": ["ok"], "download": ["ok"]}


def _big_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "variables.data").write_bytes(os.urandom(BIG))
    (path / "small.json").write_text('{"epoch": 3}')
    return path


@pytest.mark.parametrize("how,chunk_mib,fault", [
    ("publish", None, "503"),  # the client's own chunk size: the session's one PUT is answered 503
    ("publish", 4, "503"),  # 4 MiB chunks: the second of three PUTs is answered 503, after the first was stored
    ("sync", 4, "drop"),  # the same session cut off: the connection drops on the second chunk
])
def test_a_resumable_upload_interrupted_part_way_completes_with_its_checksum(
    bucket, fault_proxy, stored_gcs, monkeypatch, tmp_path, how, chunk_mib, fault
):
    if chunk_mib:
        monkeypatch.setattr(storage, "UPLOAD_CHUNK_BYTES", chunk_mib * 1024 * 1024)
    failing = 0 if chunk_mib is None else 1  # which PUT of the session fails
    proxy = fault_proxy({**ALL_OK, "chunk": ["ok"] * failing + [fault] + ["ok"] * 10})
    source = _big_folder(tmp_path / "source")

    if how == "publish":
        checksums = storage.publish_dir(source, f"gs://{bucket}/models/v1", manifest=True)
        assert checksums["variables.data"] == storage.md5_base64(source / "variables.data")
        assert storage.verify_version(f"gs://{bucket}/models/v1")["variables.data"] == checksums["variables.data"]
        prefix = "models/v1"
    else:
        step = storage.mirror(f"gs://{bucket}/state", write_back="trial_0")
        with step as folder:
            shutil.copytree(source, folder / "trial_0")
            step.sync()
        prefix = "state/trial_0"
        blob = stored_gcs.bucket(bucket).get_blob(f"{prefix}/variables.data")
        assert blob.md5_hash == storage.md5_base64(source / "variables.data")

    assert {k: v for k, v in _stored(stored_gcs, bucket, prefix).items() if k != "MANIFEST.json"} == _contents(source)
    # The proxy saw the session: it was opened once, and the failed chunk was sent again at the same offset.
    sessions = [entry for entry in proxy.seen("upload") if "uploadType=resumable" in entry[2]]
    chunks = proxy.seen("chunk")
    assert len(sessions) == 1
    assert chunks[failing][4] == fault and chunks[failing + 1][3] == chunks[failing][3]
    expected_puts = 1 if chunk_mib is None else BIG // (chunk_mib * 1024 * 1024)
    assert len(chunks) == expected_puts + 1
    assert chunks[-1][3] == f"bytes {BIG - BIG // expected_puts}-{BIG - 1}/{BIG}"


def test_a_download_cut_off_mid_stream_is_resumed_and_every_byte_arrives(bucket, fault_proxy, stored_gcs, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    stored_gcs.bucket(bucket).blob("data/x.bin").upload_from_string(data)
    proxy = fault_proxy({**ALL_OK, "download": ["cut", "ok"]})

    fetched = storage.fetch(f"gs://{bucket}/data", tmp_path / "work")

    assert (fetched / "x.bin").read_bytes() == data
    first, second = proxy.seen("download")
    # Cut after half the body; the client asked for the rest only, and the MD5 of the whole held.
    assert first[4] == "cut" and second[3] == f"bytes={len(data) // 2}-"


def test_a_download_cut_off_every_time_is_one_clear_storage_error_and_leaves_no_file(
    bucket, fault_proxy, stored_gcs, monkeypatch, tmp_path
):
    stored_gcs.bucket(bucket).blob("data/x.bin").upload_from_string(os.urandom(3 * 1024 * 1024))
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    fault_proxy({**ALL_OK, "download": ["cut"]})

    with pytest.raises(StorageError) as failed:
        storage.fetch(f"gs://{bucket}/data", tmp_path / "work")

    assert str(failed.value).startswith(f"GCS kept failing for `gs://{bucket}/data` (")
    assert "after retrying for up to 2 s" in str(failed.value) and "\n" not in str(failed.value)
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file()]


@pytest.mark.parametrize("single", [False, True], ids=["folder", "one-object"])
def test_a_truncated_download_that_looks_complete_is_caught_by_its_md5(bucket, fault_proxy, stored_gcs, tmp_path,
                                                                     single):
    """Half the body, a Content-Length to match and no hash header: only kftune's MD5 check can tell."""
    stored_gcs.bucket(bucket).blob("data/x.bin").upload_from_string(os.urandom(3 * 1024 * 1024))
    proxy = fault_proxy({**ALL_OK, "download": ["short"]})
    uri = f"gs://{bucket}/data/x.bin" if single else f"gs://{bucket}/data"

    with pytest.raises(StorageError, match=rf"`gs://{bucket}/data/x\.bin` was corrupted on the way \(its MD5 differs "
                                           "from the one GCS lists for it\\): run the step again"):
        storage.fetch(uri, tmp_path / "work")

    assert proxy.injected["short"] >= 1
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file()]


def test_a_listing_of_more_than_one_page_returns_every_object(bucket, fault_proxy, stored_gcs, monkeypatch, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from gcp_storage_emulator.storage import Storage

    # The emulator rewrites its whole index after every object (quadratic in the
    # objects every test left); in memory nothing reads it back, so skip that meanwhile.
    names = [f"shards/part-{i:05d}.txt" for i in range(1100)]
    target = stored_gcs.bucket(bucket)
    with monkeypatch.context() as patched, ThreadPoolExecutor(8) as pool:
        patched.setattr(Storage, "_write_config_to_file", lambda self: None)
        list(pool.map(lambda name: target.blob(name).upload_from_string(name.encode()), names))
    proxy = fault_proxy(ALL_OK)  # pages listings as GCS does: 1,000 objects a page

    listed = list(storage.list_files(f"gs://{bucket}/shards"))
    assert listed == [name.removeprefix("shards/") for name in names]
    assert len(proxy.page_tokens) == 1, "the second page was never asked for"

    fetched = storage.fetch(f"gs://{bucket}/shards", tmp_path / "work")
    assert sorted(p.name for p in fetched.iterdir()) == listed
    assert (fetched / "part-01099.txt").read_text() == "shards/part-01099.txt"
    assert len(proxy.page_tokens) == 2


# ---------------------------------------------------------------- rejected credentials


@pytest.fixture
def refreshable_client(monkeypatch):
    """Points kftune at the current STORAGE_EMULATOR_HOST with OAuth credentials that can be refreshed.

    The token starts as ``expired-token``; a refresh (google-auth calls it when
    GCS answers 401) hands out ``fresh-token``, or raises what ``fail`` holds.
    Returns the list of refreshes made.
    """
    import datetime
    import functools

    from google.auth import _helpers
    from google.cloud import storage as gcs
    from google.oauth2.credentials import Credentials

    refreshes: list[str] = []
    fail: list[Exception] = []

    def refresh(request, scopes):
        refreshes.append("refresh")
        if fail:
            raise fail[0]
        return "fresh-token", _helpers.utcnow() + datetime.timedelta(hours=1)

    @functools.lru_cache(maxsize=1)
    def client():
        credentials = Credentials(token="expired-token", refresh_handler=refresh)
        return gcs.Client(project="kftune-emulator", credentials=credentials)

    monkeypatch.setattr(storage, "_client", client)
    return refreshes, fail


def test_an_expired_token_answered_401_once_is_refreshed_and_nothing_is_lost(
    bucket, fault_proxy, refreshable_client, stored_gcs, tmp_path
):
    refreshes, _ = refreshable_client
    proxy = fault_proxy(ALL_OK, reject_token="expired-token")
    source = _big_folder(tmp_path / "source")

    storage.publish_dir(source, f"gs://{bucket}/models/v1", manifest=True)
    fetched = storage.fetch_version(f"gs://{bucket}/models/v1", tmp_path / "work")

    assert {k: v for k, v in _contents(fetched).items() if k != "MANIFEST.json"} == _contents(source)
    # Each request sent with the expired token (the client sends its first few at
    # once, so their 401s and resends interleave with other requests in the log)
    # was answered 401, refreshed and sent again, and the resend went through.
    log = proxy.log
    rejected = [i for i, entry in enumerate(log) if entry[4] == "401"]
    assert 1 <= len(rejected) == len(refreshes) and len(log) > 2 * len(rejected)
    for i in rejected:
        resent = [entry[4] for entry in log[i + 1:] if entry[:4] == log[i][:4]]
        assert resent and resent[-1] == "ok", (log[i], resent)
    assert all(entry[4] in ("ok", "401") for entry in log)


def test_credentials_rejected_for_good_are_one_storage_error_naming_the_uri(
    bucket, fault_proxy, refreshable_client, tmp_path
):
    refreshes, fail = refreshable_client
    uri = f"gs://{bucket}/models/v1"
    proxy = fault_proxy({"api": ["401"]})  # every request, whatever the token

    with pytest.raises(StorageError) as rejected:
        storage.publish_dir(_folder(tmp_path / "source"), uri, manifest=True)
    assert str(rejected.value).startswith(f"GCS rejected the credentials used for `gs://{bucket}` (")
    assert str(rejected.value).endswith("): refresh or replace them.") and "\n" not in str(rejected.value)
    assert refreshes and proxy.requests >= 2  # the client refreshed and tried again before giving up

    from google.auth.exceptions import RefreshError

    fail.append(RefreshError("('invalid_grant: Token has been expired or revoked.')"))
    refreshes.clear()
    with pytest.raises(StorageError, match=rf"GCS rejected the credentials used for `gs://{bucket}` \(RefreshError: "
                                           r".*invalid_grant.*\): refresh or replace them\."):
        storage.exists(uri)


def test_a_401_with_credentials_that_cannot_be_refreshed_is_one_storage_error(bucket, fault_proxy):
    """The emulator's anonymous credentials: google-auth cannot refresh them, and says so with an exception of its own."""
    fault_proxy({"api": ["401"]})
    with pytest.raises(StorageError, match=rf"^GCS rejected the credentials used for `gs://{bucket}` \(InvalidOperation: "
                                           r"Anonymous credentials cannot be refreshed.\): refresh or replace them\.$"):
        list(storage.list_files(f"gs://{bucket}/data"))
