"""Export component: an immutable, verified model version in object storage."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def export(
    model: Input[Model],
    dataset: Input[Dataset],
    evaluations: Input[Artifact],
    config: str,
    run_name: str,
    model_card: Output[Markdown],
    gate_config: str = "{}",
    run_parameters: str = "{}",
    deploy_config: str = "{}",
    serving_image: str = "",
) -> NamedTuple("Published", [("exported_uri", str), ("chosen_candidate", str), ("Output", str)]):
    """Writes the chosen model to <destination>/<N>/: a SavedModel, model.keras, any TFLite files, metadata.json.

    An existing version is never overwritten; checksums are read back after
    upload. With serving_name set, the version also holds the InferenceService
    that serves it (inferenceservice.yaml, which the deploy step applies).

    Args:
        model: The chosen model (the compare step's output).
        dataset: The dataset it was trained on (its fingerprint and split sizes are recorded).
        evaluations: Every candidate's test figures (evaluate's output), recorded and shown in the model card.
        config: The export settings (from the validation step): export_destination
            (resolved: the pipeline root's exports/ when left empty), export_version.
        run_name: The run's name (set by the pipeline), recorded as the source.
        model_card: Output: the version's README.md, its model card: what it classifies, the data,
            every candidate's test figures, the gate, how to call it, known limits, the code version.
        gate_config: The gate's thresholds (from the validation step), recorded.
        run_parameters: Every pipeline parameter of the run (from the validation step), recorded
            so that `kftune reproduce` can run it again.
        deploy_config: The deploy settings (from the validation step): serving_name,
            serving_namespace, serving_storage_uri, canary_traffic_percent, serving_timeout.
            The default deploys nothing.
        serving_image: kftune's CPU image (set by the pipeline), the predictor's
            container when the chosen candidate is a TFLite file.

    Returns:
        The URI of the exported version, the candidate it holds, and "deploy" when
        serving_name is set (the deploy step runs then), else "none". The last is
        named Output: the only output name kfp.local 2.17 resolves in a condition.
    """
    import json

    from kftune import deploy, parameters
    from kftune import export as ex
    from kftune.errors import user_errors

    with open(evaluations.path) as f:
        measured = json.load(f)
    metadata = {
        "source_run": run_name,
        "candidate": model.metadata.get("candidate", ""),
        "model_file": model.metadata.get("model_file", ""),
        "metrics": model.metadata.get("metrics", {}),
        "evaluations": measured,
        "gate": json.loads(gate_config),
        "parameters": json.loads(run_parameters),
    }
    with user_errors():
        settings = parameters.load(ex.ExportConfig, config)
        serving = parameters.load(deploy.DeployConfig, deploy_config)
        uri, checksums = ex.export(model.path, settings.export_destination, metadata,
                                   version=settings.export_version, dataset_dir=dataset.path,
                                   extra_files=deploy.manifest_files(serving, serving_image))
        with open(model_card.path, "w") as f:
            f.write(ex.read_card(uri))
    print(f"export: wrote {len(checksums)} files to {uri}, checksums read back and verified")
    return uri, metadata["candidate"], "deploy" if serving.serving_name else "none"
