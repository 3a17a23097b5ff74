"""Export component: an immutable, verified model version in object storage."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def export(
    model: Input[Model],
    dataset: Input[Dataset],
    config: str,
    run_name: str,
) -> NamedTuple("Published", [("exported_uri", str), ("chosen_candidate", str)]):
    """Writes the chosen model to destination/version/: model.keras, a SavedModel, any TFLite files, metadata.json.

    An existing version is never overwritten; checksums are read back after upload.

    Args:
        model: The chosen model (the compare step's output).
        dataset: The dataset it was trained on (its fingerprint is recorded).
        config: The export settings (from the validation step): export_destination
            (resolved: the pipeline root's exports/ when left empty), export_version.
        run_name: The run's name (set by the pipeline), recorded as the source.

    Returns:
        The URI of the exported version, and the candidate it holds.
    """
    from kftune import export as ex
    from kftune import parameters
    from kftune.errors import user_errors

    metadata = {
        "source_run": run_name,
        "candidate": model.metadata.get("candidate", ""),
        "model_file": model.metadata.get("model_file", ""),
        "metrics": model.metadata.get("metrics", {}),
    }
    with user_errors():
        settings = parameters.load(ex.ExportConfig, config)
        uri, checksums = ex.export(model.path, settings.export_destination, metadata,
                                   version=settings.export_version, dataset_dir=dataset.path)
    print(f"export: wrote {len(checksums)} files to {uri}, checksums read back and verified")
    return uri, metadata["candidate"]
