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
            mobilenet_v2, efficientnet_b0, resnet50.
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
        checkpoint_uri: Folder for per-epoch checkpoints that outlive the pod
            (a rerun with the same folder resumes); empty: none kept.
    """
    from kftune import finetune as ft
    from kftune import report
    from kftune.errors import user_errors

    with user_errors():
        config = ft.FinetuneConfig(
            backbone=backbone, weights=weights, epochs=epochs, finetune_epochs=finetune_epochs,
            unfreeze_layers=unfreeze_layers, unfreeze_steps=unfreeze_steps, learning_rate=learning_rate,
            finetune_lr_factor=finetune_lr_factor, input_size=input_size, patience=patience, seed=seed,
        )
        result = ft.finetune(dataset.path, baseline.path, config, model.path,
                             checkpoint_dir=checkpoint_uri or None, tensorboard_dir=tensorboard.path)
    for phase in result.phases:
        history = phase["history"]
        for name in ("val_accuracy", "val_loss"):
            if history.get(name):
                metrics.log_metric(f"{phase['phase']}_{name}", history[name][-1])
    model.metadata.update({"stage": "finetuned", "backbone": backbone or "search winner"})
    with open(curves.path, "w") as f:
        f.write(report.page("Fine-tuning curves", report.history_plot(result.phases)))
