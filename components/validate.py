"""Validation component: every setting and every location the run will touch, checked first.

The first step of the pipeline, on the CPU image and never retried: a setting
typed wrong in the Kubeflow run form fails here, in seconds, with one line
naming it, before any step asks for a GPU. It hands each later step its
settings as one JSON config (the fields of that step's config dataclass), so
no later step re-declares a parameter.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Markdown, Output

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def validate(
    source: str,
    image_size: int,
    channels: int,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    max_corrupt_fraction: float,
    augment_spec: str,
    augment_copies: int,
    search_space: str,
    search_algorithm: str,
    max_trials: int,
    early_stopping: str,
    parallel_trials: int,
    trial_epochs: int,
    folds: int,
    model: str,
    search_state_uri: str,
    backbone: str,
    weights: str,
    finetune_epochs: int,
    unfreeze_epochs: int,
    unfreeze_layers: int,
    unfreeze_steps: int,
    finetune_learning_rate: float,
    finetune_lr_factor: float,
    backbone_input_size: int,
    patience: int,
    checkpoint_uri: str,
    prune_method: str,
    target_sparsity: float,
    prune_schedule: str,
    prune_initial_sparsity: float,
    prune_epochs: int,
    prune_begin_step: int,
    prune_end_step: int,
    prune_frequency: int,
    prune_layer_types: str,
    prune_allocation: str,
    prune_m_by_n: str,
    prune_learning_rate: float,
    prune_quantize: str,
    prune_max_accuracy_drop: float,
    prune_sparsity_levels: str,
    prune_distill_weight: float,
    prune_distill_temperature: float,
    min_accuracy: float,
    max_accuracy_drop: float,
    max_size_bytes: int,
    export_destination: str,
    export_version: str,
    serving_name: str,
    serving_namespace: str,
    serving_storage_uri: str,
    canary_traffic_percent: int,
    serving_timeout: int,
    pipeline_root: str,
    run_id: str,
    search_config: Output[Artifact],
    settings: Output[Markdown],
) -> NamedTuple("Validated", [("Output", list), ("ingest", str), ("augment", str), ("finetune", str),
                               ("prune", str), ("gate", str), ("export", str), ("deploy", str),
                               ("parameters", str)]):
    """Checks every pipeline parameter and location; hands each step its settings.

    Args:
        The pipeline's parameters, each as the run form describes it
        (kftune/parameters.py lists them; `kftune run-local --help` prints them),
        then:
        pipeline_root: The run's pipeline root (set by the pipeline).
        run_id: The run's id (set by the pipeline); per-run locations are named after it.
        search_config: Output: the search steps' settings (JSON). A file, not a
            string, since kfp.local 2.17 replaces a task-output parameter that enters
            a loop with the loop item.
        settings: Output: every setting of the run and every location checked.

    Returns:
        The search workers' indices as strings (the pipeline's loop items: named
        `Output`, the only name kfp.local 2.17 resolves as a loop's items), then
        each later step's settings as JSON, then every pipeline parameter as the run
        received it (JSON; the export records it, so `kftune reproduce` can run it again).
    """
    import json

    from kftune import parameters
    from kftune.errors import user_errors

    values = {name: value for name, value in locals().items() if name in parameters.BY_NAME}
    with user_errors():
        checked = parameters.resolve(parameters.validate(values), pipeline_root, run_id)
        locations = parameters.check_locations(checked)
    with open(search_config.path, "w") as f:
        f.write(checked.stage_json("search"))
    with open(settings.path, "w") as f:
        f.write(parameters.settings_markdown(checked, locations))
    print("validate: every setting checked; " + "; ".join(locations or ["no location to check"]))
    workers = [str(i) for i in range(checked.search.parallel_trials)]
    return (workers, *(checked.stage_json(s) for s in ("ingest", "augment", "finetune", "prune", "gate", "export",
                                                        "deploy")), json.dumps(values, sort_keys=True))
