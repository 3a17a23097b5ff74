"""Prune component: tfmot magnitude pruning or structured pruning, with what it gained and lost."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components import KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def prune(
    dataset: Input[Dataset],
    model: Input[Model],
    pruned: Output[Model],
    metrics: Output[Metrics],
    report_html: Output[HTML],
    config: str,
):
    """Prunes while training on: low-magnitude weights (tfmot, stripped after), or whole filters and units
    (prune_method=structured: a smaller dense model rebuilt and fine-tuned).

    Args:
        dataset: The (augmented) dataset; its validation split measures every model.
        model: The model to prune (the fine-tuned one).
        pruned: Output: the pruned model (stripped, or structured: rebuilt smaller), with model_<mode>.tflite
            beside it per quantize mode.
        metrics: Output: accuracy, loss, sizes (raw and gzip), parameters and latency (batch 1 and 32)
            before and after, sparsity, and the same for each TFLite file.
        report_html: Output: the same, per layer, for the Kubeflow UI (the step's one report).
        config: The prune settings (from the validation step): target_sparsity and the
            prune_* parameters (method, schedule, epochs, steps, layer types, 2:4, learning
            rate, quantization, accuracy budget), seed, checkpoint_uri (each level's training
            checkpointed every epoch: a retried pod resumes there).
    """
    from kftune import parameters, storage
    from kftune import prune as pr
    from kftune.errors import user_errors

    with user_errors():
        settings = parameters.load(pr.PruneConfig, config)
        checkpoints = storage.mirror(pr.checkpoint_location(settings, dataset.path, model.path))
    with user_errors(), checkpoints as checkpoint_dir:
        result = pr.prune(dataset.path, model.path, settings, pruned.path, checkpoint_dir=checkpoint_dir,
                          after_epoch=checkpoints.sync)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    pruned.metadata.update({
        "stage": "pruned",
        "prune_method": result.method,
        "sparsity": result.sparsity["overall"],
        "tflite": [values["file"] for values in result.tflite.values()],
    })
    with open(report_html.path, "w") as f:
        f.write(result.html())
