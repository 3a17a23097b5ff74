"""Prune component: tfmot magnitude pruning, with what it gained and lost."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components import KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def prune(
    dataset: Input[Dataset],
    model: Input[Model],
    pruned: Output[Model],
    metrics: Output[Metrics],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    target_sparsity: float,
    schedule: str,
    initial_sparsity: float,
    epochs: int,
    begin_step: int,
    end_step: int,
    frequency: int,
    layer_types: str,
    m_by_n: str,
    learning_rate: float,
    seed: int,
    quantize: str,
    max_accuracy_drop: float,
    sparsity_levels: str,
):
    """Prunes low-magnitude weights while training on, then strips the wrappers.

    Args:
        dataset: The (augmented) dataset; its validation split measures every model.
        model: The model to prune (the fine-tuned one).
        pruned: Output: the pruned, stripped model, with model_<mode>.tflite beside it per quantize mode.
        metrics: Output: accuracy, loss, sizes (raw and gzip) and latency before and after, sparsity,
            and the same for each TFLite file.
        report_html: Output: the same, per layer, for the Kubeflow UI.
        report_md: Output: the same as Markdown.
        target_sparsity: Share of weights set to zero, in [0, 1).
        schedule: constant (tfmot ConstantSparsity) or polynomial (PolynomialDecay).
        initial_sparsity: Where the polynomial schedule starts.
        epochs: Epochs of training while pruning.
        begin_step: Training step at which pruning starts.
        end_step: Training step at which pruning ends; 0 for the end of training.
        frequency: Prune every this many steps.
        layer_types: Layer classes to prune, e.g. Conv2D,Dense; empty: all prunable.
        m_by_n: 2:4 for structured sparsity (needs target_sparsity 0.5); empty for none.
        learning_rate: Learning rate while pruning.
        seed: Seeds shuffling and augmentation.
        quantize: TFLite post-training quantization: dynamic, int8, or dynamic,int8 for both; empty for none.
        max_accuracy_drop: Accuracy budget (0.01 = one point): keep the highest of sparsity_levels
            within it; 0 prunes to target_sparsity.
        sparsity_levels: The levels the accuracy-budget search tries, e.g. 0.5,0.7,0.8,0.9.
    """
    from kftune import prune as pr
    from kftune.errors import user_errors

    with user_errors():
        config = pr.PruneConfig(
            target_sparsity=target_sparsity, schedule=schedule, initial_sparsity=initial_sparsity, epochs=epochs,
            begin_step=begin_step, end_step=end_step, frequency=frequency, layer_types=layer_types, m_by_n=m_by_n,
            learning_rate=learning_rate, seed=seed, quantize=quantize, max_accuracy_drop=max_accuracy_drop,
            sparsity_levels=sparsity_levels,
        )
        result = pr.prune(dataset.path, model.path, config, pruned.path)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    pruned.metadata.update({
        "stage": "pruned",
        "sparsity": result.sparsity["overall"],
        "tflite": [values["file"] for values in result.tflite.values()],
    })
    with open(report_html.path, "w") as f:
        f.write(result.html())
    with open(report_md.path, "w") as f:
        f.write(result.markdown())
