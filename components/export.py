"""Export component: an immutable, verified model version in object storage."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def export(
    model: Input[Model],
    dataset: Input[Dataset],
    pipeline_root: str,
    run_name: str,
    destination: str,
    version: str,
) -> str:
    """Writes the chosen model to destination/version/: model.keras, a SavedModel, any TFLite files, metadata.json.

    An existing version is never overwritten; checksums are read back after upload.

    Args:
        model: The chosen model (the compare step's output).
        dataset: The dataset it was trained on (its fingerprint is recorded).
        pipeline_root: The run's pipeline root (set by the pipeline).
        run_name: The run's name (set by the pipeline), recorded as the source.
        destination: gs://BUCKET/PREFIX or a local folder; empty: <pipeline root>/exports.
        version: The version folder; empty: a UTC timestamp (vYYYYMMDD-HHMMSS).

    Returns:
        The URI of the exported version.
    """
    from kftune import export as ex
    from kftune.errors import user_errors

    metadata = {
        "source_run": run_name,
        "candidate": model.metadata.get("candidate", ""),
        "model_file": model.metadata.get("model_file", ""),
        "metrics": model.metadata.get("metrics", {}),
    }
    with user_errors():
        uri, checksums = ex.export(model.path, destination or f"{pipeline_root.rstrip('/')}/exports", metadata,
                                   version=version, dataset_dir=dataset.path)
    print(f"export: wrote {len(checksums)} files to {uri}, checksums read back and verified")
    return uri
