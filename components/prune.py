"""Prune component: tfmot magnitude pruning, with what it gained and lost."""

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
    target_sparsity: float,
    schedule: str,
    initial_sparsity: float,
    epochs: int,
    frequency: int,
    layer_types: str,
    m_by_n: str,
    learning_rate: float,
    seed: int,
):
    """Prunes low-magnitude weights while training on, then strips the wrappers.

    Args:
        dataset: The (augmented) dataset.
        model: The model to prune (the fine-tuned one).
        pruned: Output: the pruned, stripped model.
        metrics: Output: accuracy, loss, sizes and latency before and after.
        report_html: Output: the same, per layer, for the Kubeflow UI.
        target_sparsity: Share of weights set to zero, in [0, 1).
        schedule: constant (tfmot ConstantSparsity) or polynomial (PolynomialDecay).
        initial_sparsity: Where the polynomial schedule starts.
        epochs: Epochs of training while pruning.
        frequency: Prune every this many steps.
        layer_types: Layer classes to prune, e.g. Conv2D,Dense; empty: all prunable.
        m_by_n: 2:4 for structured sparsity; empty for none.
        learning_rate: Learning rate while pruning.
        seed: Seeds shuffling and augmentation.
    """
    from kftune import prune as pr
    from kftune import report
    from kftune.errors import user_errors

    with user_errors():
        config = pr.PruneConfig(
            target_sparsity=target_sparsity, schedule=schedule, initial_sparsity=initial_sparsity, epochs=epochs,
            frequency=frequency, layer_types=layer_types, m_by_n=m_by_n, learning_rate=learning_rate, seed=seed,
        )
        result = pr.prune(dataset.path, model.path, config, pruned.path)
    for when, values in (("before", result.before), ("after", result.after)):
        for name, value in values.items():
            metrics.log_metric(f"{when}_{name}", value)
    metrics.log_metric("sparsity", result.sparsity["overall"])
    pruned.metadata.update({"stage": "pruned", "sparsity": result.sparsity["overall"]})
    keys = ["accuracy", "loss", "size_bytes", "gzip_bytes", "latency_ms"]
    rows = [[k, result.before[k], result.after[k], result.after[k] / result.before[k] if result.before[k] else ""] for k in keys]
    note = (
        "<p>The raw size does not change: pruning zeroes weights but keeps them. The saving shows "
        "once the file is compressed (gzip column) or in a runtime that stores sparse tensors.</p>"
    )
    body = (
        report.html_table(["validation", "before", "after", "after / before"], rows) + note
        + "<h3>Sparsity of the stripped weights</h3>"
        + report.html_table(["layer", "sparsity"], sorted(result.sparsity.items()))
    )
    with open(report_html.path, "w") as f:
        f.write(report.page(f"Pruning to {target_sparsity:.0%} ({schedule})", body))
