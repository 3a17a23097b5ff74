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
SHIPPED = {"model.keras", "model.json", "model_dynamic.tflite", "metadata.json", "saved_model/saved_model.pb"}


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
    uri, checksums = ex.export(model_dir, str(tmp_path / "exports"), caller, version="v1", dataset_dir=digits_dir)

    version = Path(uri)
    assert version == tmp_path / "exports" / "v1"
    assert checksums == _local_files(version) and SHIPPED <= set(checksums)
    assert checksums["model_dynamic.tflite"] == storage.md5_base64(model_dir / "model_dynamic.tflite")
    metadata = json.loads((version / "metadata.json").read_text())
    assert {k: metadata[k] for k in caller} == caller
    assert metadata["version"] == "v1" and metadata["hyperparameters"] == HYPERPARAMETERS
    assert metadata["data_fingerprint"] == dataset.fingerprint(digits_dir) != ""
    assert metadata["class_names"] == [str(i) for i in range(10)]
    assert metadata["files"]["tflite"] == ["model_dynamic.tflite"]
    # The SavedModel serves what the Keras model predicts, and the version loads back as a kftune model.
    images, _ = dataset.load_arrays(digits_dir, "test")
    keras_model, meta = models.load(version)
    saved_model = tf.saved_model.load(str(version / "saved_model"))
    served = saved_model.serve(tf.constant(images[:8], tf.float32))
    np.testing.assert_allclose(served.numpy(), keras_model.predict(images[:8].astype(np.float32), verbose=0), atol=1e-5)
    assert meta.stage == "pruned"

    with pytest.raises(ExistsError, match=r"exports/v1` already exists and kftune never overwrites an export: "
                                          "choose a new version"):
        ex.export(model_dir, str(tmp_path / "exports"), {"source_run": "run-2"}, version="v1")
    assert _local_files(version) == checksums


def test_gcs_export_uploads_verifies_and_refuses_to_overwrite(model_dir, digits_dir, bucket, tmp_path):
    destination = f"gs://{bucket}/models/digits"
    uri, checksums = ex.export(model_dir, destination, {"source_run": "run-1"}, version="v1", dataset_dir=digits_dir)

    assert uri == f"{destination}/v1"
    blobs = {b.name: b for b in storage._client().list_blobs(bucket, prefix="models/digits/v1/")}
    assert {name.removeprefix("models/digits/v1/"): b.md5_hash for name, b in blobs.items()} == checksums
    assert SHIPPED <= set(checksums)
    fetched = storage.fetch(uri, tmp_path / "fetched")
    assert _local_files(fetched) == checksums
    assert json.loads((fetched / "metadata.json").read_text())["data_fingerprint"] == dataset.fingerprint(digits_dir)

    # The emulator would overwrite silently (it ignores if_generation_match=0);
    # the refusal comes from the check for an existing version, before any upload.
    with pytest.raises(ExistsError, match=f"`{uri}` already exists"):
        ex.export(model_dir, destination, {"source_run": "run-2"}, version="v1", dataset_dir=digits_dir)
    after = {b.name: b.generation for b in storage._client().list_blobs(bucket, prefix="models/digits/v1/")}
    assert after == {name: b.generation for name, b in blobs.items()}


def test_export_to_a_missing_bucket_says_so(model_dir, gcs_emulator):
    with pytest.raises(StorageError, match=r"GCS bucket `kftune-no-such-bucket` does not exist: create it"):
        ex.export(model_dir, "gs://kftune-no-such-bucket/models", {}, version="v1")


@pytest.mark.parametrize("version", ["../v1", "v1/extra", ".hidden", "v" * 129])
def test_bad_version_is_refused_before_any_work(model_dir, tmp_path, version):
    with pytest.raises(InputError, match="Received: version="):
        ex.export(model_dir, str(tmp_path / "exports"), {}, version=version)
    assert not (tmp_path / "exports").exists()


def test_empty_destination_is_refused():
    with pytest.raises(InputError, match="`destination` is empty: give gs://BUCKET/PREFIX or a local folder"):
        ex.check_destination(" ", "v1")


def test_export_component_records_the_run_and_maps_a_taken_version_to_a_user_error(
    model_dir, digits_dir, tmp_path, capsys
):
    from kfp.dsl import Dataset, Model

    from components.export import export

    chosen = Model(uri=str(model_dir), metadata={"candidate": "quantized", "model_file": "model_dynamic.tflite",
                                                 "metrics": {"accuracy": 0.9, "gzip_bytes": 1234}})
    data = Dataset(uri=str(digits_dir))
    arguments = dict(model=chosen, dataset=data, run_name="run-7",
                     config=json.dumps({"export_destination": f"{tmp_path}/exports", "export_version": "v3"}))

    uri, candidate = export.python_func(**arguments)
    assert candidate == "quantized"

    assert uri == f"{tmp_path}/exports/v3"
    metadata = json.loads(Path(uri, "metadata.json").read_text())
    assert (metadata["source_run"], metadata["candidate"], metadata["model_file"]) == ("run-7", "quantized", "model_dynamic.tflite")
    assert metadata["metrics"] == {"accuracy": 0.9, "gzip_bytes": 1234}
    assert "checksums read back and verified" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        export.python_func(**arguments)
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
        target=json.dumps({"export_destination": str(destination), "export_version": "v1"}))

    assert (destination / "v1" / "saved_model" / "saved_model.pb").exists() is exported
    assert run.output == (str(destination / "v1") if exported else "")
    if exported:
        metadata = json.loads((destination / "v1" / "metadata.json").read_text())
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
export.export(sys.argv[1], sys.argv[2], {"source_run": "run-1"}, version="v1")
"""


def _objects(client, bucket: str, prefix: str) -> dict[str, int]:
    """Generation of every object under ``prefix``, read past the proxy."""
    return {b.name[len(prefix) + 1:]: b.generation for b in client.list_blobs(bucket, prefix=f"{prefix}/")}


def test_an_export_killed_part_way_is_invisible_and_a_rerun_finishes_it(
    model_dir, bucket, fault_proxy, stored_gcs, tmp_path
):
    """A real export process, SIGKILLed after its first files are up, then the same version exported again."""
    destination = f"gs://{bucket}/models/digits"
    uri = f"{destination}/v1"
    # The proxy passes the first two uploads and holds the third until the process is gone:
    # the kill lands part-way through the upload every time.
    held = fault_proxy({"api": ["ok"], "download": ["ok"], "upload": ["ok", "ok"] + ["hang"] * 100}, hold_s=300)
    child = subprocess.Popen([sys.executable, "-c", _EXPORT_ONCE, str(model_dir), destination], cwd=ROOT,
                             env={**os.environ, "STORAGE_EMULATOR_HOST": held.url, "KFTUNE_GCS_TIMEOUT": "300"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while len(held.seen("upload")) < 3 or len(_objects(stored_gcs, bucket, "models/digits/v1")) < 2:
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
    left = _objects(stored_gcs, bucket, "models/digits/v1")
    assert sorted(left) == ["metadata.json", "model.json"]  # no model.keras, no saved_model/, no manifest

    fault_proxy({"api": ["ok"], "download": ["ok"], "upload": ["ok"]})
    # What was left is no version: nothing says it exists, readers refuse it in one line.
    assert not ex.version_exists(uri)
    assert storage.exists(uri)  # the objects are there; only the manifest makes them a version
    for read in (lambda: ex.verify(uri), lambda: ex.read_version(uri, tmp_path / "read")):
        with pytest.raises(InputError) as refused:
            read()
        assert str(refused.value).startswith(f"`{uri}` is not a complete export: it has no MANIFEST.json")
        assert "\n" not in str(refused.value)

    rerun = fault_proxy({"api": ["ok"], "download": ["ok"], "upload": ["ok"]})
    uri_again, checksums = ex.export(model_dir, destination, {"source_run": "run-2"}, version="v1")

    assert uri_again == uri and ex.version_exists(uri)
    assert ex.verify(uri) == {k: v for k, v in checksums.items() if k != ex.MANIFEST_FILE}
    assert SHIPPED | {ex.MANIFEST_FILE} <= set(checksums) == set(_objects(stored_gcs, bucket, "models/digits/v1"))
    # The killed run's model.json was the same file and was kept; its metadata.json was replaced.
    assert "models/digits/v1/model.json" not in rerun.uploaded
    assert "models/digits/v1/metadata.json" in rerun.uploaded
    assert rerun.uploaded[-1] == "models/digits/v1/MANIFEST.json"  # the one last write
    folder = ex.read_version(uri, tmp_path / "read")
    assert json.loads((folder / "metadata.json").read_text())["source_run"] == "run-2"
    keras_model, meta = models.load(folder)
    assert meta.stage == "pruned" and keras_model.output_shape[-1] == 10


def test_a_complete_version_is_never_overwritten_on_either_back_end(model_dir, bucket, stored_gcs, tmp_path):
    for destination in (f"gs://{bucket}/models", str(tmp_path / "exports")):
        uri, checksums = ex.export(model_dir, destination, {"source_run": "run-1"}, version="v1")
        assert ex.version_exists(uri) and ex.verify(uri)
        before = (_objects(stored_gcs, bucket, "models/v1") if storage.is_gcs(uri)
                  else {p: p.stat().st_mtime_ns for p in Path(uri).rglob("*")})

        with pytest.raises(ExistsError, match=f"`{uri}` already exists and kftune never overwrites an export"):
            ex.export(model_dir, destination, {"source_run": "run-2"}, version="v1")

        after = (_objects(stored_gcs, bucket, "models/v1") if storage.is_gcs(uri)
                 else {p: p.stat().st_mtime_ns for p in Path(uri).rglob("*")})
        assert after == before
        assert json.loads((ex.read_version(uri, tmp_path / "read") / "metadata.json").read_text())["source_run"] == "run-1"


def test_a_local_folder_without_a_manifest_is_refused_not_replaced(model_dir, tmp_path):
    """Locally a version appears by one rename, so a folder there is never kftune's partial: never replaced."""
    version = tmp_path / "exports" / "v1"
    version.mkdir(parents=True)
    (version / "model.keras").write_text("someone's earlier export")

    assert ex.version_exists(str(version))
    with pytest.raises(ExistsError, match=r"already exists and kftune never overwrites an export: choose a new "
                                          r"version\. It has no MANIFEST\.json, so it is no complete kftune export"):
        ex.export(model_dir, str(tmp_path / "exports"), {}, version="v1")
    with pytest.raises(InputError, match="is not a complete export: it has no MANIFEST.json"):
        ex.verify(str(version))
    assert (version / "model.keras").read_text() == "someone's earlier export"
