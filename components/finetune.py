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
    backbone: str,
    weights: str,
    epochs: int,
    finetune_epochs: int,
    unfreeze_layers: int,
    unfreeze_steps: int,
    learning_rate: float,
    finetune_lr_factor: float,
    input_size: int,
    patience: int,
    seed: int,
    checkpoint_uri: str,
    pipeline_root: str,
    run_id: str,
):
    """Fine-tunes the search winner, or a pretrained keras.applications backbone.

    Args:
        dataset: The (augmented) dataset.
        baseline: The search winner; its hyperparameters set the defaults.
        model: Output: the fine-tuned model.
        metrics: Output: final accuracy and loss per phase.
        curves: Output: training curves.
        tensorboard: Output: TensorBoard logs.
        backbone: Empty to continue training the search winner; or vgg16,
            mobilenet_v2, mobilenet_v2_035, efficientnet_b0, resnet50.
        weights: imagenet (needs internet), a weights file or gs:// URI, or none.
        epochs: Epochs of the head phase (or of continued training).
        finetune_epochs: Epochs of each unfreezing step.
        unfreeze_layers: Top layers of the backbone made trainable by the end.
        unfreeze_steps: Steps in which they are unfrozen.
        learning_rate: 0 takes the search's best.
        finetune_lr_factor: Unfreezing steps use learning_rate times this.
        input_size: Backbone input size; 0 keeps the dataset's.
        patience: Early-stopping patience in epochs.
        seed: Seeds shuffling, augmentation and initialisation.
        checkpoint_uri: Folder or gs:// prefix for per-epoch checkpoints; a
            rerun with the same one resumes. Empty: under the pipeline root, per
            run, so a retried pod resumes from its last finished epoch.
        pipeline_root: The run's pipeline root (set by the pipeline).
        run_id: The run's id (set by the pipeline).
    """
    from kftune import finetune as ft
    from kftune import report, storage
    from kftune.errors import user_errors

    checkpoints = storage.mirror(checkpoint_uri or f"{pipeline_root.rstrip('/')}/kftune-checkpoints/{run_id}/finetune")
    with user_errors(), checkpoints as checkpoint_dir:
        config = ft.FinetuneConfig(
            backbone=backbone, weights=weights, epochs=epochs, finetune_epochs=finetune_epochs,
            unfreeze_layers=unfreeze_layers, unfreeze_steps=unfreeze_steps, learning_rate=learning_rate,
            finetune_lr_factor=finetune_lr_factor, input_size=input_size, patience=patience, seed=seed,
        )
        result = ft.finetune(dataset.path, baseline.path, config, model.path, checkpoint_dir=checkpoint_dir,
                             tensorboard_dir=tensorboard.path, after_epoch=checkpoints.sync)
    for phase in result.phases:
        history = phase["history"]
        for name in ("val_accuracy", "val_loss"):
            if history.get(name):
                metrics.log_metric(f"{phase['phase']}_{name}", history[name][-1])
    model.metadata.update({"stage": "finetuned", "backbone": backbone or "search winner"})
    with open(curves.path, "w") as f:
        f.write(report.page("Fine-tuning curves", report.history_plot(result.phases)))
