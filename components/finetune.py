"""Fine-tune component: frozen-head training, then gradual unfreezing."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components import KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def finetune(
    dataset: Input[Dataset],
    baseline: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[HTML],
    tensorboard: Output[dsl.Artifact],
    config: str,
):
    """Fine-tunes the search winner, or a pretrained keras.applications backbone.

    Args:
        dataset: The (augmented) dataset.
        baseline: The search winner; its hyperparameters set the defaults.
        model: Output: the fine-tuned model.
        metrics: Output: final accuracy and loss per phase.
        curves: Output: training curves.
        tensorboard: Output: TensorBoard logs.
        config: The fine-tune settings (from the validation step): backbone, weights,
            finetune_epochs, unfreeze_epochs, unfreeze_layers, unfreeze_steps,
            finetune_learning_rate, finetune_lr_factor, backbone_input_size, patience,
            seed, checkpoint_uri (per-epoch checkpoints: a retried pod resumes there).
    """
    from kftune import finetune as ft
    from kftune import parameters, report, storage
    from kftune.errors import user_errors

    with user_errors():
        settings = parameters.load(ft.FinetuneConfig, config)
        checkpoints = storage.mirror(ft.checkpoint_location(settings, dataset.path, baseline.path))
    with user_errors(), checkpoints as checkpoint_dir:
        result = ft.finetune(dataset.path, baseline.path, settings, model.path, checkpoint_dir=checkpoint_dir,
                             tensorboard_dir=tensorboard.path, after_epoch=checkpoints.sync)
    for phase in result.phases:
        history = phase["history"]
        for name in ("val_accuracy", "val_loss"):
            if history.get(name):
                metrics.log_metric(f"{phase['phase']}_{name}", history[name][-1])
    model.metadata.update({"stage": "finetuned", "backbone": settings.backbone or "search winner"})
    with open(curves.path, "w") as f:
        f.write(report.page("Fine-tuning curves", report.history_plot(result.phases)))
