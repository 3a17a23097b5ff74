"""Faults and untrusted artifacts: flaky storage, killed pods, and what an artifact must never make kftune do.

Storage faults are real: the GCS emulator behind tests/faultproxy.py, a
loopback proxy that fails a share of requests (429, 503, dropped connections,
lost answers, requests that never answer). Kills are real SIGKILLs of real
processes. The source scans read kftune's own code.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from faultproxy import FAULTS, FaultProxy
from kfp.dsl import Artifact, Dataset, Markdown, Model

from kftune import search, storage
from kftune.errors import StorageError

ROOT = Path(__file__).resolve().parents[1]

# Every kind of fault, on about a third of all requests.
FLAKY = {
    "upload": ["lost_reply", "ok", "ok", "503", "ok", "slow", "429", "ok", "drop", "ok", "ok", "ok"],
    "download": ["ok", "503", "ok", "slow", "ok", "lost_reply", "ok", "ok"],
    "api": ["ok", "ok", "503", "ok", "429", "slow", "ok", "drop", "ok", "hang", "ok", "ok", "lost_reply", "ok"],
}


@pytest.fixture
def proxy(fault_proxy, monkeypatch):
    """Starts a FaultProxy (conftest's fault_proxy) with the given schedule, requests timing out after a second."""

    def start(schedule: dict[str, list[str]]) -> FaultProxy:
        # A request that hangs is given up on after a second, then retried.
        monkeypatch.setenv(storage.TIMEOUT_ENV, "1")
        return fault_proxy(schedule, hold_s=3.0)

    return start


def _folder(path: Path) -> Path:
    (path / "saved_model" / "variables").mkdir(parents=True)
    (path / "model.keras").write_bytes(os.urandom(300_000))
    (path / "model.json").write_text('{"family": "small_cnn"}')
    (path / "saved_model" / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(50_000))
    return path


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stored(bucket: str, prefix: str) -> dict[str, bytes]:
    """What the emulator holds under ``prefix``, read past the proxy."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="direct", credentials=AnonymousCredentials(),
                        client_options={"api_endpoint": os.environ["KFTUNE_TEST_EMULATOR"]})
    return {b.name[len(prefix) + 1:]: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=f"{prefix}/")}


@pytest.fixture(autouse=True)
def _remember_the_emulator(gcs_emulator, monkeypatch):
    monkeypatch.setenv("KFTUNE_TEST_EMULATOR", gcs_emulator)


# ---------------------------------------------------------------- storage: retries through a flaky network


def test_publish_fetch_and_mirror_complete_through_a_flaky_network(bucket, proxy, tmp_path):
    faults = proxy(FLAKY)
    source = _folder(tmp_path / "source")

    checksums = storage.publish_dir(source, f"gs://{bucket}/models/v1")

    assert checksums == {name: storage.md5_base64(source / name) for name in _contents(source)}
    assert _stored(bucket, "models/v1") == _contents(source)
    # The upload whose answer was lost was retried, met GCS's precondition refusal
    # (the object was there) and was recognised as its own by its checksum.
    assert faults.preconditions_refused >= 1

    fetched = storage.fetch(f"gs://{bucket}/models/v1", tmp_path / "work")
    assert _contents(fetched) == _contents(source)

    step = storage.mirror(f"gs://{bucket}/state", write_back="trial_0")
    with step as folder:
        (folder / "trial_0").mkdir()
        for epoch in range(3):
            (folder / "trial_0" / "epochs.json").write_text(json.dumps(list(range(epoch + 1))))
            (folder / "trial_0" / f"ckpt-{epoch}.data").write_bytes(os.urandom(20_000))
            step.sync()
    stored = _stored(bucket, "state")
    assert json.loads(stored["trial_0/epochs.json"]) == [0, 1, 2] and len(stored) == 4
    assert set(faults.injected) >= set(FAULTS), faults.injected


def test_a_sync_uploads_in_write_order_and_only_what_changed(bucket, proxy, tmp_path):
    """Storage passes through the states the disk did: a checkpoint's data before the pointer naming it."""
    faults = proxy({"api": ["ok"], "upload": ["ok"], "download": ["ok"]})
    step = storage.mirror(f"gs://{bucket}/state", write_back="")
    with step as folder:
        for name in ("b-data", "a-pointer"):  # written in this order: not the order of their names
            (folder / name).write_text(name)
            time.sleep(0.01)
        step.sync()
        (folder / "b-data").write_text("epoch 2")
        step.sync()
        step.sync()
    assert faults.uploaded == ["state/b-data", "state/a-pointer", "state/b-data"]


def test_an_outage_longer_than_the_retry_deadline_is_one_clear_storage_error(bucket, proxy, tmp_path, monkeypatch,
                                                                             capsys):
    from components import export as c_export

    monkeypatch.setenv(storage.RETRY_ENV, "2")
    proxy({"api": ["503"], "upload": ["503"], "download": ["503"]})
    with pytest.raises(StorageError, match=rf"GCS kept failing for `gs://{bucket}` \(.*503.*\) after retrying for up "
                                           rf"to 2 s: the service or the network is unavailable. Run the step again"):
        storage.exists(f"gs://{bucket}/models/v1")

    (tmp_path / "evaluations").write_text("[]")
    with pytest.raises(SystemExit) as stopped:
        # Export looks at the destination before it reads the model: neither folder is needed.
        c_export.export.python_func(model=Model(uri=str(tmp_path / "model")), dataset=Dataset(uri=str(tmp_path / "data")),
                                    evaluations=Artifact(uri=str(tmp_path / "evaluations")),
                                    model_card=Markdown(uri=str(tmp_path / "card.md")),
                                    run_name="run", config=json.dumps({"export_destination": f"gs://{bucket}/models",
                                                                       "export_version": "1"}))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kftune:")]
    assert stopped.value.code == 3
    assert len(lines) == 1 and lines[0].startswith("kftune: storage error: GCS kept failing"), lines


# ---------------------------------------------------------------- killed pods: resume from what is in storage


def _stored_epochs(bucket: str, log: str) -> list[int]:
    """The epochs an epoch log in the bucket lists as finished."""
    blob = storage._client().bucket(bucket).get_blob(log)
    return [e["epoch"] for e in json.loads(blob.download_as_bytes())] if blob else []


def _kill_and_run_again(script: str, bucket: str, log: str, epochs: int) -> tuple[list[int], str]:
    """Runs ``script`` as a pod runs a step, SIGKILLs it once ``log`` in the bucket lists two epochs, and runs it
    again to the end. Returns the epochs stored before the kill and the second run's stdout.

    Its own process group, as a pod: the kill takes the step and any child process (a trial's) together.
    """
    first = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while first.poll() is None and time.time() < deadline and len(_stored_epochs(bucket, log)) < 2:
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = _stored_epochs(bucket, log)
    assert 2 <= len(before) < epochs, f"not killed part-way: {before}"
    second = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    trained = [int(line.split()[1].split("/")[0]) for line in second.stdout.splitlines() if line.startswith("Epoch ")]
    # Every epoch stored before the kill was kept. The log is written just before its
    # epoch's checkpoint, so at most the last logged epoch is trained again.
    assert trained[0] in (len(before), len(before) + 1), (before, trained)
    assert trained == list(range(trained[0], epochs + 1))
    assert _stored_epochs(bucket, log) == list(range(epochs))
    return before, second.stdout


def test_a_trial_killed_part_way_resumes_from_object_storage(bucket, digits_dir, tmp_path):
    """A search worker as a pod runs it, its state in GCS: SIGKILL to the whole pod after two epochs, run it again."""
    settings = tmp_path / "search_config"
    settings.write_text(json.dumps(dataclasses.asdict(search.SearchConfig(
        search_space="{learning_rate: {type: choice, values: [0.003]}}", max_trials=1, parallel_trials=1,
        trial_epochs=6, search_state_uri=f"gs://{bucket}/state"))))
    script = textwrap.dedent(f"""
        from kfp.dsl import Artifact, Dataset
        from components import search
        print(search.search_worker.python_func(dataset=Dataset(uri={str(digits_dir)!r}),
              search_config=Artifact(uri={str(settings)!r}), worker="0"))
    """)
    _, out = _kill_and_run_again(script, bucket, f"state/{search.TRIALS_DIR}/trial_0/fold0.epochs.json", 6)
    assert out.strip().splitlines()[-1] == "1"  # the restarted worker finished its own trial
    (result,) = search.told(f"gs://{bucket}/state")
    assert result.status == "COMPLETED" and result.epochs == 6


def test_a_prune_step_killed_part_way_resumes_from_object_storage(bucket, digits_dir, trained_model_dir, tmp_path):
    """The prune step as a pod runs it, its checkpoints in GCS: SIGKILL after two epochs, the pod run again."""
    from kftune import prune as pr

    fields = {**dataclasses.asdict(pr.PruneConfig()), "target_sparsity": 0.5, "prune_epochs": 6,
              "checkpoint_uri": f"gs://{bucket}/ck"}
    location = pr.checkpoint_location(pr.PruneConfig(**fields), digits_dir, trained_model_dir)
    script = textwrap.dedent(f"""
        from kfp.dsl import HTML, Dataset, Metrics, Model
        from components import prune
        prune.prune.python_func(dataset=Dataset(uri={str(digits_dir)!r}), model=Model(uri={str(trained_model_dir)!r}),
                                pruned=Model(uri={str(tmp_path / "pruned")!r}), metrics=Metrics(uri={str(tmp_path / "m")!r}),
                                report_html=HTML(uri={str(tmp_path / "r.html")!r}), config={json.dumps(fields)!r})
    """)
    _, out = _kill_and_run_again(script, bucket, f"{storage.parse_gcs(location)[1]}/level0.5000.epochs.json", 6)
    assert "prune: 50% resumes from its checkpoint after epoch " in out
    saved = json.loads((tmp_path / "pruned" / "model.json").read_text())["hyperparameters"]["prune"]
    assert saved["measured_sparsity"] == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------- untrusted artifacts: nothing in them runs


SOURCES = sorted([*ROOT.glob("kftune/**/*.py"), *ROOT.glob("components/**/*.py"), *ROOT.glob("pipelines/**/*.py")])

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
EXTRACTION = {"extractall", "extract", "unpack_archive"}
# The one place kftune extracts an archive (a dataset source), and the test that holds it to its folder.
EXTRACTS = {"kftune/dataset.py": "tests/test_dataset.py::test_an_archive_that_cannot_be_read_or_reaches_outside_is_refused"}


def unsafe_calls(source: str) -> list[str]:
    """What in ``source`` could run code hidden in an artifact, or write where an archive says.

    Imports of the pickle family; numpy loads without allow_pickle=False; YAML
    loads other than safe_load; eval and exec; Keras model loads without
    safe_mode=True; archive extraction (outside EXTRACTS, whose entries each
    name the test that it refuses paths escaping its folder).
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name == "load" and owner in ("np", "numpy") and keywords.get("allow_pickle") != "False":
            found.append(ast.unparse(node))
        if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"):
            found.append(ast.unparse(node))
        if name in ("eval", "exec") and not owner:
            found.append(ast.unparse(node))
        if name == "load_model" and keywords.get("safe_mode") != "True":
            found.append(ast.unparse(node))
        if name in EXTRACTION or (owner == "tarfile" and name == "open"):
            found.append(ast.unparse(node))
    return found


def test_the_scan_finds_what_it_looks_for():
    planted = textwrap.dedent("""
        import pickle
        from joblib import load
        import numpy as np
        import yaml
        np.load("x.npy")
        np.load("x.npy", allow_pickle=True)
        yaml.load(text)
        eval(text)
        keras.models.load_model(path, safe_mode=False)
        tarfile.open(path).extractall(target)
    """)
    assert len(unsafe_calls(planted)) == 9
    assert unsafe_calls("np.load('x.npy', allow_pickle=False)\nyaml.safe_load(t)\nk.load_model(p, safe_mode=True)") == []


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_code_path_can_run_what_an_artifact_carries(path):
    found = unsafe_calls(path.read_text())
    if str(path.relative_to(ROOT)) in EXTRACTS:
        found = [call for call in found if not re.search(r"\.extractall\(|^tarfile\.open\(", call)]
    assert found == []


def test_each_place_that_extracts_an_archive_has_the_test_that_holds_it_to_its_folder():
    for module, test in EXTRACTS.items():
        assert any(re.search(r"\.extractall\(", call) for call in unsafe_calls((ROOT / module).read_text())), module
        file, name = test.split("::")
        assert f"def {name}(" in (ROOT / file).read_text(), test


def test_a_lambda_layer_in_an_artifact_never_runs(tmp_path):
    """Beyond being refused: the function in the artifact is not called while it is refused."""
    from kftune import models
    from kftune.errors import InputError

    marker = tmp_path / "ran"
    k = models.keras()
    inputs = k.Input((4,))
    # What an attacker's artifact would carry: code with a side effect, no closure needed.
    payload = eval(f"lambda t: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), t)[1]")  # noqa: S307
    k.Model(inputs, k.layers.Lambda(payload)(inputs)).save(tmp_path / models.MODEL_FILE)
    marker.unlink()  # building the model here ran it once, in the test's own process
    script = f"from kftune import models\nmodels.load({str(tmp_path)!r})"
    process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "InputError" in process.stderr and "not a loadable Keras model" in process.stderr
    assert not marker.exists()
    with pytest.raises(InputError, match="Lambda layers and custom code are refused"):
        models.load(tmp_path)


# ---------------------------------------------------------------- resource bounds


def test_ingest_memory_does_not_grow_with_the_dataset(tmp_path):
    """TFRecord ingest streams: 10x the examples cost a few MB more, not 10x the data.

    One process ingests 300 examples, then 3,000 (64x64 noise PNGs, about 37 MB
    of encoded images more), and reports its peak RSS after each. Holding the
    encoded images in memory, as ingest once did, adds about their size (35 MB
    measured); streaming adds about 3 MB. bench/bench_memory.py measures the
    same at the bundled dataset's scale, for training too.
    """
    script = textwrap.dedent(f"""
        import json, resource
        import numpy as np, tensorflow as tf
        from kftune import dataset

        def shard(folder, count):
            folder.mkdir()
            rng = np.random.default_rng(0)
            with tf.io.TFRecordWriter(str(folder / "data.tfrecord")) as writer:
                for i in range(count):
                    png = tf.io.encode_png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).numpy()
                    writer.write(tf.train.Example(features=tf.train.Features(feature={{
                        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 4]))}})).SerializeToString())
            return folder

        from pathlib import Path
        root = Path({str(tmp_path)!r})
        small, large = shard(root / "small", 300), shard(root / "large", 3000)
        peaks = []
        for source in (small, large):
            dataset.ingest(dataset.IngestConfig(source=str(source), image_size=16), root / (source.name + "-out"),
                           progress=lambda _: None)
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps({{"peaks_mb": peaks, "extra_data_mb": ((large / "data.tfrecord").stat().st_size
                                                              - (small / "data.tfrecord").stat().st_size) / 2**20}}))
    """)
    process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    measured = json.loads(process.stdout.strip().splitlines()[-1])
    (small, large), extra = measured["peaks_mb"], measured["extra_data_mb"]
    assert extra > 30
    assert large - small < extra / 3, measured


def test_checkpoints_deleted_by_the_step_are_deleted_in_storage_too(bucket):
    """Retention: storage keeps what the checkpoint folder keeps (TensorFlow keeps the newest), not every epoch."""
    root = f"gs://{bucket}/state"
    storage._client().bucket(bucket).blob("state/oracle/oracle.json").upload_from_string("another step's file")
    step = storage.mirror(root, write_back="trials/trial_0")
    with step as folder:
        trial = folder / "trials" / "trial_0"
        trial.mkdir(parents=True)
        for epoch in range(3):
            (trial / f"ckpt-{epoch}.data").write_text(f"weights after epoch {epoch}")
            (trial / f"ckpt-{epoch - 1}.data").unlink(missing_ok=True)
            step.sync()
            names = sorted(b.name for b in storage._client().list_blobs(bucket))
            assert names == ["state/oracle/oracle.json", f"state/trials/trial_0/ckpt-{epoch}.data"], names
        (folder / "oracle" / "oracle.json").unlink()  # not this step's to delete
    assert [b.name for b in storage._client().list_blobs(bucket, prefix="state/oracle")] == ["state/oracle/oracle.json"]
