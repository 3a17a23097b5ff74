"""The kftune pipeline: ingest -> augment -> search -> fine-tune -> prune -> evaluate -> export.

Wiring only: every default comes from the core's config dataclasses.
"""

from kfp import dsl

from components.augment import augment
from components.evaluate import compare, evaluate
from components.export import export
from components.finetune import finetune
from components.ingest import ingest
from components.prune import prune
from kftune.augment import MILD_YAML
from kftune.dataset import IngestConfig
from kftune.evaluate import GateConfig
from kftune.finetune import FinetuneConfig
from kftune.prune import PruneConfig
from kftune.search import CLASSIC_SPACE_YAML, SearchConfig
from pipelines import cluster
from pipelines.search_steps import search_steps

_INGEST, _SEARCH, _FT, _PRUNE, _GATE = IngestConfig(), SearchConfig(), FinetuneConfig(), PruneConfig(), GateConfig()


@dsl.pipeline(
    name="kftune-tuning",
    description="Search, fine-tune, prune, evaluate and export a Keras image classifier.",
)
def tuning_pipeline(
    source: str = _INGEST.source,
    image_size: int = _INGEST.image_size,
    channels: int = _INGEST.channels,
    validation_fraction: float = _INGEST.validation_fraction,
    test_fraction: float = _INGEST.test_fraction,
    seed: int = _INGEST.seed,
    max_corrupt_fraction: float = _INGEST.max_corrupt_fraction,
    augment_spec: str = MILD_YAML,
    augment_copies: int = 0,
    search_space: str = CLASSIC_SPACE_YAML,
    search_algorithm: str = _SEARCH.algorithm,
    max_trials: int = _SEARCH.max_trials,
    trial_epochs: int = _SEARCH.epochs,
    folds: int = _SEARCH.folds,
    model: str = _SEARCH.model,
    search_rounds: int = 3,
    trials_per_round: int = 2,
    search_state_uri: str = "",
    backbone: str = _FT.backbone,
    weights: str = _FT.weights,
    finetune_epochs: int = _FT.epochs,
    unfreeze_epochs: int = _FT.finetune_epochs,
    unfreeze_layers: int = _FT.unfreeze_layers,
    unfreeze_steps: int = _FT.unfreeze_steps,
    finetune_learning_rate: float = _FT.learning_rate,
    finetune_lr_factor: float = _FT.finetune_lr_factor,
    backbone_input_size: int = _FT.input_size,
    patience: int = _FT.patience,
    checkpoint_uri: str = "",
    target_sparsity: float = _PRUNE.target_sparsity,
    prune_schedule: str = _PRUNE.schedule,
    prune_initial_sparsity: float = _PRUNE.initial_sparsity,
    prune_epochs: int = _PRUNE.epochs,
    prune_begin_step: int = _PRUNE.begin_step,
    prune_end_step: int = _PRUNE.end_step,
    prune_frequency: int = _PRUNE.frequency,
    prune_layer_types: str = _PRUNE.layer_types,
    prune_m_by_n: str = _PRUNE.m_by_n,
    prune_learning_rate: float = _PRUNE.learning_rate,
    prune_quantize: str = _PRUNE.quantize,
    prune_max_accuracy_drop: float = _PRUNE.max_accuracy_drop,
    prune_sparsity_levels: str = _PRUNE.sparsity_levels,
    min_accuracy: float = _GATE.min_accuracy,
    max_accuracy_drop: float = _GATE.max_accuracy_drop,
    max_size_bytes: int = _GATE.max_size_bytes,
    export_destination: str = "",
    export_version: str = "",
):
    data = ingest(
        source=source, image_size=image_size, channels=channels, validation_fraction=validation_fraction,
        test_fraction=test_fraction, seed=seed, max_corrupt_fraction=max_corrupt_fraction,
    ).set_display_name("ingest")
    augmented = augment(
        dataset=data.outputs["dataset"], spec=augment_spec, copies=augment_copies, seed=seed
    ).set_display_name("augment")
    train_data = augmented.outputs["augmented"]

    searching = search_steps(
        train_data, space=search_space, algorithm=search_algorithm, max_trials=max_trials, epochs=trial_epochs,
        folds=folds, seed=seed, model=model, rounds=search_rounds, trials_per_round=trials_per_round,
        state_uri=search_state_uri,
    )
    searched = searching.result

    tuned = finetune(
        dataset=train_data, baseline=searched.outputs["model"], backbone=backbone, weights=weights,
        epochs=finetune_epochs, finetune_epochs=unfreeze_epochs, unfreeze_layers=unfreeze_layers,
        unfreeze_steps=unfreeze_steps, learning_rate=finetune_learning_rate, finetune_lr_factor=finetune_lr_factor,
        input_size=backbone_input_size, patience=patience, seed=seed, checkpoint_uri=checkpoint_uri,
        pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("fine-tune")
    pruned = prune(
        dataset=train_data, model=tuned.outputs["model"], target_sparsity=target_sparsity, schedule=prune_schedule,
        initial_sparsity=prune_initial_sparsity, epochs=prune_epochs, begin_step=prune_begin_step,
        end_step=prune_end_step, frequency=prune_frequency, layer_types=prune_layer_types, m_by_n=prune_m_by_n,
        learning_rate=prune_learning_rate, seed=seed, quantize=prune_quantize,
        max_accuracy_drop=prune_max_accuracy_drop, sparsity_levels=prune_sparsity_levels,
    ).set_display_name("prune")

    candidates = {
        "baseline": searched.outputs["model"],
        "finetuned": tuned.outputs["model"],
        "pruned": pruned.outputs["pruned"],
    }
    evaluations = {
        name: evaluate(dataset=data.outputs["dataset"], model=candidate, name=name, tflite_file="")
        .set_display_name(f"evaluate: {name}")
        for name, candidate in candidates.items()
    }
    # The int8 TFLite file the prune step writes beside the pruned model (absent unless prune_quantize asks for it).
    evaluations["quantized"] = evaluate(
        dataset=data.outputs["dataset"], model=pruned.outputs["pruned"], name="quantized", tflite_file="model_int8.tflite"
    ).set_display_name("evaluate: quantized")
    gate = compare(
        baseline_eval=evaluations["baseline"].outputs["evaluation"],
        finetuned_eval=evaluations["finetuned"].outputs["evaluation"],
        pruned_eval=evaluations["pruned"].outputs["evaluation"],
        quantized_eval=evaluations["quantized"].outputs["evaluation"],
        baseline=candidates["baseline"], finetuned=candidates["finetuned"], pruned=candidates["pruned"],
        min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop, max_size_bytes=max_size_bytes,
    ).set_display_name("compare and gate")
    with dsl.If(gate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 - a KFP condition, not Python
        exported = export(
            model=gate.outputs["chosen"], dataset=data.outputs["dataset"], pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER,
            run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, destination=export_destination, version=export_version,
        ).set_display_name("export")

    # Resources, GPUs, retries, caching and credentials per step, from the cluster profile (pipelines/cluster.py).
    cluster.apply(data, augmented, *searching.all, tuned, pruned, *evaluations.values(), gate, exported)
