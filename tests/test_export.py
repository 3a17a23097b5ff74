"""Export: an immutable, verified version, locally and on a real GCS emulator."""

import json
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
