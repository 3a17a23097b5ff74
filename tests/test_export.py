"""Export: an immutable, verified version, locally and on a real GCS emulator."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kftune import dataset, models, storage
from kftune import export as ex
from kftune.errors import EXIT_INPUT, ExistsError, InputError, StorageError

HYPERPARAMETERS = {"learning_rate": 0.003, "batch_size": 32}
SHIPPED = {"model.keras", "model.json", "model_dynamic.tflite", "metadata.json", "saved_model.pb",
           "variables/variables.index"}


@pytest.fixture(scope="module")
def model_dir(digits_dir, tmp_path_factory):
    """A small real model for the digits, saved as the steps save it, with a TFLite file beside it."""
    import tensorflow as tf

    info = dataset.DatasetInfo.load(digits_dir)
    tf.keras.utils.set_random_seed(0)
    model = models.small_cnn(info.shape, info.num_classes, filters=4, num_layers=1, dense_units=8)
    folder = models.save(model, tmp_path_factory.mktemp("chosen"), models.ModelMeta(
        family="small_cnn", class_names=info.class_names, input_shape=list(info.shape),
        hyperparameters=HYPERPARAMETERS, stage="pruned"))
    (folder / "model_dynamic.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return folder


def _local_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): storage.md5_base64(p) for p in folder.rglob("*") if p.is_file()}


def test_local_export_writes_a_servable_version_and_never_overwrites_it(model_dir, digits_dir, tmp_path):
    import tensorflow as tf

    caller = {"source_run": "run-1", "candidate": "pruned", "metrics": {"accuracy": 0.91}}
    uri, checksums = ex.export(model_dir, str(tmp_path / "exports"), caller, dataset_dir=digits_dir)

    version = Path(uri)
    assert version == tmp_path / "exports" / "1"  # the first version of a new base
    assert checksums == _local_files(version) and SHIPPED <= set(checksums)
    assert checksums["model_dynamic.tflite"] == storage.md5_base64(model_dir / "model_dynamic.tflite")
    metadata = json.loads((version / "metadata.json").read_text())
    assert {k: metadata[k] for k in caller} == caller
    assert metadata["version"] == "1" and metadata["hyperparameters"] == HYPERPARAMETERS
    assert metadata["data_fingerprint"] == dataset.fingerprint(digits_dir) != ""
    assert metadata["class_names"] == [str(i) for i in range(10)]
    assert metadata["files"]["tflite"] == ["model_dynamic.tflite"]
    serving = metadata["serving"]
    assert (serving["runtime"], serving["candidate"], serving["model_file"]) == ("tensorflow", "pruned", "saved_model.pb")
    assert (serving["image_size"], serving["channels"], serving["class_names"]) == (16, 3, metadata["class_names"])
    assert serving["files"]["model_dynamic.tflite"].endswith("not chosen")
    # The SavedModel at the version's top serves what the Keras model predicts, and the version loads back.
    images, _ = dataset.load_arrays(digits_dir, "test")
    keras_model, meta = models.load(version)
    saved_model = tf.saved_model.load(str(version))
    served = saved_model.signatures["serving_pixels"](images=tf.constant(images[:8], tf.float32))
    np.testing.assert_allclose(served["probabilities"].numpy(), keras_model.predict(images[:8].astype(np.float32), verbose=0),
                               atol=1e-5)
    assert meta.stage == "pruned"

    # Another run's export is the next number; naming a number that is taken is refused, nothing touched.
    uri2, _ = ex.export(model_dir, str(tmp_path / "exports"), {"source_run": "run-2"}, dataset_dir=digits_dir)
    assert uri2 == str(tmp_path / "exports" / "2") and ex.resolve(str(tmp_path / "exports")) == uri2
    with pytest.raises(ExistsError, match=r"version 1 of `.*exports` is taken \(claimed by run-1\) and kftune never "
                                          "overwrites an export"):
        ex.export(model_dir, str(tmp_path / "exports"), {"source_run": "run-3"}, version="1")
    assert _local_files(version) == checksums
    # A retry of run-1's export (same run, same model: a KFP retry after the pod died) gets its own version back.
    assert ex.export(model_dir, str(tmp_path / "exports"), caller, dataset_dir=digits_dir) == (uri, checksums)
    assert ex.numbers(str(tmp_path / "exports")) == [1, 2]


def test_the_metadata_names_the_tflite_candidate_and_the_saved_models_role(model_dir, tmp_path):
    uri, _ = ex.export(model_dir, str(tmp_path / "exports"),
                       {"source_run": "run-1", "candidate": "quantized", "model_file": "model_dynamic.tflite"})
    serving = json.loads(Path(uri, "metadata.json").read_text())["serving"]
    assert (serving["runtime"], serving["candidate"], serving["model_file"]) == ("kftune", "quantized",
                                                                                  "model_dynamic.tflite")
    assert serving["files"]["model_dynamic.tflite"].startswith("the chosen candidate (quantized), served by `kftune serve`")
    assert serving["files"]["saved_model.pb"].startswith("the pruned model in float: what TF Serving")


def test_gcs_export_uploads_verifies_and_refuses_to_overwrite(model_dir, digits_dir, bucket, tmp_path):
    destination = f"gs://{bucket}/models/digits"
    uri, checksums = ex.export(model_dir, destination, {"source_run": "run-1"}, version="7", dataset_dir=digits_dir)

    assert uri == f"{destination}/7"
    blobs = {b.name: b for b in storage._client().list_blobs(bucket, prefix="models/digits/7/")}
    assert {name.removeprefix("models/digits/7/"): b.md5_hash for name, b in blobs.items()} == checksums
    assert SHIPPED <= set(checksums)
    # The staging copy is gone; only the claim (and the retry's key) stay beside the versions.
    control = sorted(b.name for b in storage._client().list_blobs(bucket, prefix="models/digits/.kftune/"))
    assert [n for n in control if "/staging/" in n] == [] and "models/digits/.kftune/claims/7.json" in control
    fetched = storage.fetch(uri, tmp_path / "fetched")
    assert _local_files(fetched) == checksums
    assert json.loads((fetched / "metadata.json").read_text())["data_fingerprint"] == dataset.fingerprint(digits_dir)
    assert ex.resolve(destination) == uri and ex.numbers(destination) == [7]

    with pytest.raises(ExistsError, match=r"version 7 of `gs://.*` is taken \(claimed by run-1\)"):
        ex.export(model_dir, destination, {"source_run": "run-2"}, version="7", dataset_dir=digits_dir)
    after = {b.name: b.generation for b in storage._client().list_blobs(bucket, prefix="models/digits/7/")}
    assert after == {name: b.generation for name, b in blobs.items()}
    assert ex.export(model_dir, destination, {"source_run": "run-2"})[0] == f"{destination}/8"


def test_export_to_a_missing_bucket_says_so(model_dir, gcs_emulator):
    with pytest.raises(StorageError, match=r"GCS bucket `kftune-no-such-bucket` does not exist: create it"):
        ex.export(model_dir, "gs://kftune-no-such-bucket/models", {}, version="1")


@pytest.mark.parametrize("version", ["v1", "../1", "1/extra", "01", "0", "-3", "1.5", "9" * 19])
def test_a_version_that_is_not_a_whole_number_is_refused_before_any_work(model_dir, tmp_path, version):
    with pytest.raises(InputError, match=r"`version` must be a whole number >= 1 \(TF Serving and KServe load "
                                         r"<base>/<N>/ with N an integer\), or empty for the next free number\. "
                                         "Received: version="):
        ex.export(model_dir, str(tmp_path / "exports"), {}, version=version)
    assert not (tmp_path / "exports").exists()


def test_empty_destination_is_refused():
    with pytest.raises(InputError, match="`destination` is empty: give gs://BUCKET/PREFIX or a local folder"):
        ex.check_destination(" ", "1")


def test_export_component_records_the_run_and_maps_a_taken_version_to_a_user_error(
    model_dir, digits_dir, tmp_path, capsys
):
    from kfp.dsl import Artifact, Dataset, Markdown, Model

    from components.export import export
    from kftune import evaluate

    chosen = Model(uri=str(model_dir), metadata={"candidate": "quantized", "model_file": "model_dynamic.tflite",
                                                 "metrics": {"accuracy": 0.9, "gzip_bytes": 1234}})
    data = Dataset(uri=str(digits_dir))
    # Real measurements of the two candidates in the folder, as the evaluate step writes them.
    measured = [evaluate.evaluate("pruned", model_dir, digits_dir),
                evaluate.evaluate_tflite("quantized", model_dir / "model_dynamic.tflite", digits_dir)]
    (tmp_path / "evaluations").write_text(json.dumps([json.loads(e.to_json()) for e in measured]))
    parameters = {"image_size": 16, "max_trials": 3, "seed": 0}
    arguments = dict(model=chosen, dataset=data, run_name="run-7", evaluations=Artifact(uri=str(tmp_path / "evaluations")),
                     model_card=Markdown(uri=str(tmp_path / "card.md")),
                     gate_config=json.dumps({"min_accuracy": 0.5, "max_accuracy_drop": 0.02, "max_size_bytes": 0}),
                     run_parameters=json.dumps(parameters),
                     config=json.dumps({"export_destination": f"{tmp_path}/exports", "export_version": "3"}))

    uri, candidate, deploys = export.python_func(**arguments)
    assert (candidate, deploys) == ("quantized", "none")  # no serving_name: nothing to deploy

    assert uri == f"{tmp_path}/exports/3"
    metadata = json.loads(Path(uri, "metadata.json").read_text())
    assert (metadata["source_run"], metadata["candidate"], metadata["model_file"]) == ("run-7", "quantized", "model_dynamic.tflite")
    assert metadata["metrics"] == {"accuracy": 0.9, "gzip_bytes": 1234}
    assert metadata["parameters"] == parameters and metadata["gate"]["max_accuracy_drop"] == 0.02
    assert [e["name"] for e in metadata["evaluations"]] == ["pruned", "quantized"]
    assert metadata["splits"] == dataset.DatasetInfo.load(digits_dir).splits
    code = metadata["code_version"]
    assert code["kftune"] == "0.1.0" and len(code["git_commit"]) == 40 and code["tensorflow"].startswith("2.21")
    # The model card is in the version (covered by its manifest) and is the Run UI's Markdown artifact.
    card = Path(uri, "README.md").read_text()
    assert Path(tmp_path / "card.md").read_text() == card and "README.md" in ex.verify(uri)
    assert card.startswith("# Model card: version 3\n")
    for expected in ("Exported candidate: **quantized**", f"`{metadata['data_fingerprint']}`",
                     f"| test images | {metadata['splits']['test']} |", "| **quantized** (exported) | model_dynamic.tflite |",
                     f"| pruned | model.keras | {measured[0].accuracy:.4f} |", "Test accuracy at least 0.5, at most 0.02",
                     "kftune serve", "## Known limits", f"`{code['git_commit']}`", "kftune reproduce"):
        assert expected in card, expected
    weak = [n for n, r in zip(measured[1].class_names, measured[1].recall, strict=True) if r < 0.9]
    assert (f"`{weak[0]}`" in card.split("## Known limits")[1]) if weak else "Every class has test recall" in card
    assert "checksums read back and verified" in capsys.readouterr().out

    # A KFP retry of the task (same run, same model) gets its version back; another run's export of 3 is refused.
    assert export.python_func(**arguments) == (uri, "quantized", "none")
    with pytest.raises(SystemExit) as exit_info:
        export.python_func(**{**arguments, "run_name": "run-8"})
    assert exit_info.value.code == EXIT_INPUT
    assert "kftune: error: " in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*non-Python base image")  # the image's packages are this venv's
@pytest.mark.parametrize("min_accuracy,exported", [(0.0, True), (0.999, False)], ids=["passes", "fails"])
def test_the_gate_decides_whether_kfp_runs_the_export(model_dir, digits_dir, tmp_path, min_accuracy, exported):
    """The pipeline's nested `publish` pipeline (evaluate -> If/Else -> export or gate_failed, OneOf outputs),
    run by KFP's local runner as the pipeline wires it."""
    from kfp import dsl, local
    from kfp.dsl import Dataset, Model

    from pipelines.tuning_pipeline import _publish

    publish = dsl.pipeline(name="publish", description=_publish.__doc__)(_publish)
    destination = tmp_path / "exports"

    @dsl.pipeline
    def gate_then_export(gate: str, target: str) -> str:
        model = dsl.importer(artifact_uri=str(model_dir), artifact_class=Model).output
        data = dsl.importer(artifact_uri=str(digits_dir), artifact_class=Dataset).output
        published = publish(dataset=data, baseline=model, finetuned=model, pruned=model, gate_config=gate,
                            export_config=target)
        return published.outputs["exported_uri"]

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "runs"), raise_on_error=True)
    run = gate_then_export(
        gate=json.dumps({"min_accuracy": min_accuracy, "max_accuracy_drop": 0.01, "max_size_bytes": 0}),
        target=json.dumps({"export_destination": str(destination), "export_version": ""}))

    assert (destination / "1" / "saved_model.pb").exists() is exported
    assert run.output == (str(destination / "1") if exported else "")
    if exported:
        metadata = json.loads((destination / "1" / "metadata.json").read_text())
        assert metadata["candidate"] == "baseline"
        assert metadata["source_run"].startswith("gate-then-export")
    else:
        report = next((tmp_path / "runs").glob("*/gate-failed/report")).read_text()
        assert "baseline: accuracy" in report and "< min_accuracy 0.999" in report


# ---------------------------------------------------------------- complete or invisible

ROOT = Path(__file__).resolve().parents[1]
_EXPORT_ONCE = """
import sys
from kftune import export
uri, _ = export.export(sys.argv[1], sys.argv[2], {"source_run": sys.argv[3]})
print(uri)
"""


def _objects(client, bucket: str, prefix: str) -> dict[str, int]:
    """Generation of every object under ``prefix``, read past the proxy."""
    return {b.name[len(prefix) + 1:]: b.generation for b in client.list_blobs(bucket, prefix=f"{prefix}/")}


def test_an_export_killed_part_way_is_invisible_and_its_retry_finishes_it(
    model_dir, bucket, fault_proxy, stored_gcs, tmp_path
):
    """A real export process, SIGKILLed after its first files are up, then the same export (a KFP retry) again."""
    destination = f"gs://{bucket}/models/digits"
    staging = "models/digits/.kftune/staging/1"
    # The proxy passes the claim, its key and two files, and holds the next upload until the process is gone:
    # the kill lands part-way through the upload every time.
    held = fault_proxy({"api": ["ok"], "download": ["ok"], "upload": ["ok"] * 4 + ["hang"] * 100}, hold_s=300)
    child = subprocess.Popen([sys.executable, "-c", _EXPORT_ONCE, str(model_dir), destination, "run-1"], cwd=ROOT,
                             env={**os.environ, "STORAGE_EMULATOR_HOST": held.url, "KFTUNE_GCS_TIMEOUT": "300"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while len(held.seen("upload")) < 5 or len(_objects(stored_gcs, bucket, staging)) < 2:
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the export never got to its third file"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert len(_objects(stored_gcs, bucket, staging)) == 2

    fault_proxy({"api": ["ok"], "download": ["ok"], "upload": ["ok"]})
    # What was left is no version: a server polling the base sees no number, kftune's readers say why in one line.
    assert ex.numbers(destination) == [] and not storage.exists(f"{destination}/1")
    with pytest.raises(InputError) as refused:
        ex.resolve(destination)
    assert str(refused.value).startswith(f"`{destination}` is neither an exported version nor a model base holding one")

    rerun = fault_proxy({"api": ["ok"], "download": ["ok"], "upload": ["ok"]})
    uri, checksums = ex.export(model_dir, destination, {"source_run": "run-1"})

    assert uri == f"{destination}/1" and ex.version_exists(uri)  # the number the killed attempt claimed
    assert ex.verify(uri) == {k: v for k, v in checksums.items() if k != ex.MANIFEST_FILE}
    assert SHIPPED | {ex.MANIFEST_FILE} <= set(checksums) == set(_objects(stored_gcs, bucket, "models/digits/1"))
    assert _objects(stored_gcs, bucket, staging) == {}
    # The retry uploaded into staging again (the killed attempt's files differ: a SavedModel's fingerprint, the
    # metadata's time), its manifest last; nothing went straight into the version.
    assert rerun.uploaded[-1] == f"{staging}/MANIFEST.json"
    assert not [n for n in rerun.uploaded if n.startswith("models/digits/1/")]
    # Copied into place inside GCS: every other file, then saved_model.pb, then the manifest.
    copied = [path.rsplit("/o/", 1)[-1] for _, method, path, *_ in rerun.log if "/copyTo/" in path]
    copied = [name.replace("%2F", "/").split("?")[0].removeprefix("models/digits/1/") for name in copied]
    assert copied[-2:] == ["saved_model.pb", "MANIFEST.json"] and sorted(copied) == sorted(checksums)
    keras_model, meta = models.load(ex.read_version(uri, tmp_path / "read"))
    assert meta.stage == "pruned" and keras_model.output_shape[-1] == 10


def _poll_once(base: str, workdir: Path) -> list[int]:
    """What a model server does with a base: list the numbers, load each version whose saved_model.pb is there.

    On GCS the version is first downloaded as it is listed at that moment, as KServe's storage initializer
    does before TF Serving starts. Returns the numbers loaded; raises when one does not load.
    """
    import tensorflow as tf

    loaded = []
    for number in ex.numbers(base):
        uri = f"{base}/{number}"
        if "saved_model.pb" not in storage.list_files(uri):
            continue
        # Once saved_model.pb is visible, everything it names must be: loading must succeed.
        local = storage.fetch(uri, workdir / f"{len(list(workdir.iterdir()))}") if storage.is_gcs(uri) else uri
        tf.saved_model.load(str(local))
        loaded.append(number)
    return loaded


def _poll(base: str, workdir: Path, seen: list, errors: list, stop) -> None:
    while not stop.is_set():
        try:
            seen.extend(_poll_once(base, workdir))
        except Exception as e:  # noqa: BLE001 - the test fails on any of them
            errors.append(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("back_end", ["local", "gcs"])
def test_two_exports_racing_for_one_base_get_different_numbers_and_a_poller_loads_only_whole_versions(
    model_dir, bucket, fault_proxy, tmp_path, back_end
):
    """Two real export processes at once; a poller thread loads every version it sees while they write."""
    import threading

    if back_end == "gcs":
        # The proxy enforces if_generation_match=0 as GCS does (the emulator alone ignores it).
        proxy = fault_proxy({"api": ["ok"], "download": ["ok"], "upload": ["ok"]})
        base, env = f"gs://{bucket}/models/race", {**os.environ, "STORAGE_EMULATOR_HOST": proxy.url}
    else:
        base, env = str(tmp_path / "race"), dict(os.environ)
    seen, errors, stop, workdir = [], [], threading.Event(), tmp_path / "poller"
    workdir.mkdir()
    poller = threading.Thread(target=_poll, args=(base, workdir, seen, errors, stop), daemon=True)
    poller.start()
    children = [subprocess.Popen([sys.executable, "-c", _EXPORT_ONCE, str(model_dir), base, f"run-{i}"], cwd=ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    try:
        results = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        stop.set()
        poller.join(timeout=60)
    assert [child.returncode for child in children] == [0, 0], [err[-2000:] for _, err in results]
    assert sorted(out.strip() for out, _ in results) == [f"{base}/1", f"{base}/2"]
    assert ex.numbers(base) == [1, 2] and all(ex.verify(f"{base}/{n}") for n in (1, 2))
    assert errors == []  # every version the poller saw with its saved_model.pb loaded whole
    assert set(seen) <= {1, 2} and _poll_once(base, workdir) == [1, 2]


def test_a_complete_version_is_never_overwritten_on_either_back_end(model_dir, bucket, stored_gcs, tmp_path):
    for destination in (f"gs://{bucket}/models", str(tmp_path / "exports")):
        uri, checksums = ex.export(model_dir, destination, {"source_run": "run-1"}, version="1")
        assert ex.version_exists(uri) and ex.verify(uri)
        before = (_objects(stored_gcs, bucket, "models/1") if storage.is_gcs(uri)
                  else {p: p.stat().st_mtime_ns for p in Path(uri).rglob("*")})

        with pytest.raises(ExistsError, match=r"version 1 of .* is taken \(claimed by run-1\) and kftune never "
                                              "overwrites an export"):
            ex.export(model_dir, destination, {"source_run": "run-2"}, version="1")

        after = (_objects(stored_gcs, bucket, "models/1") if storage.is_gcs(uri)
                 else {p: p.stat().st_mtime_ns for p in Path(uri).rglob("*")})
        assert after == before
        assert json.loads((ex.read_version(uri, tmp_path / "read") / "metadata.json").read_text())["source_run"] == "run-1"


def test_a_local_folder_without_a_manifest_is_refused_not_replaced(model_dir, tmp_path):
    """Locally a version appears by one rename, so a folder there is never kftune's partial: never replaced."""
    version = tmp_path / "exports" / "1"
    version.mkdir(parents=True)
    (version / "model.keras").write_text("someone's earlier export")

    assert ex.version_exists(str(version))
    with pytest.raises(ExistsError, match=r"already exists and kftune never overwrites an export: choose a new "
                                          r"version\. It has no MANIFEST\.json, so it is no complete kftune export"):
        ex.export(model_dir, str(tmp_path / "exports"), {}, version="1")
    # Left alone when numbering too: the next free number is after it.
    assert ex.export(model_dir, str(tmp_path / "exports"), {"source_run": "run-1"})[0] == str(tmp_path / "exports" / "2")
    with pytest.raises(InputError, match="is not a complete export: it has no MANIFEST.json"):
        ex.verify(str(version))
    assert (version / "model.keras").read_text() == "someone's earlier export"
