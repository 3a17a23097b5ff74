"""Evaluate and compare components: every candidate measured alike, then gated."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    name: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
):
    """Measures one candidate on the held-out test split.

    Args:
        dataset: The dataset (its test split is used).
        model: The candidate.
        name: The candidate's name in reports (baseline, finetuned, pruned).
        evaluation: Output: every measurement as JSON, for the compare step.
        metrics: Output: accuracy, loss, top-k, size, parameters, latency.
        confusion: Output: the confusion matrix, labelled with the class names.
    """
    from kftune import evaluate as ev
    from kftune.errors import user_errors

    with user_errors():
        result = ev.evaluate(name, model.path, dataset.path)
    with open(evaluation.path, "w") as f:
        f.write(result.to_json())
    for key in ("accuracy", "loss", "top_k_accuracy", "size_bytes", "gzip_bytes", "parameters",
                "latency_ms_batch1", "latency_ms_batch32"):
        metrics.log_metric(key, getattr(result, key))
    for cls, p, r, f1 in zip(result.class_names, result.precision, result.recall, result.f1, strict=True):
        metrics.log_metric(f"f1_{cls}", f1)
    confusion.log_confusion_matrix(result.class_names, result.confusion_matrix)
    print(f"evaluate: {name} accuracy={result.accuracy:.4f} gzip={result.gzip_bytes} B")


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def compare(
    baseline_eval: Input[Artifact],
    finetuned_eval: Input[Artifact],
    pruned_eval: Input[Artifact],
    baseline: Input[Model],
    finetuned: Input[Model],
    pruned: Input[Model],
    chosen: Output[Model],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    min_accuracy: float,
    max_accuracy_drop: float,
    max_size_bytes: int,
) -> bool:
    """Compares the candidates side by side and picks the one to export.

    The smallest candidate (gzip size) that meets every threshold is chosen.

    Args:
        baseline_eval: Evaluation of the search winner.
        finetuned_eval: Evaluation of the fine-tuned model.
        pruned_eval: Evaluation of the pruned model.
        baseline: The search winner.
        finetuned: The fine-tuned model.
        pruned: The pruned model.
        chosen: Output: the chosen model.
        report_html: Output: the comparison table and accuracy-vs-size plot.
        metrics: Output: the chosen candidate's accuracy and size.
        min_accuracy: Lowest acceptable test accuracy.
        max_accuracy_drop: Largest acceptable accuracy loss against the baseline (0.01 = 1 point).
        max_size_bytes: Largest acceptable gzip size in bytes; 0 for no limit.

    Returns:
        Whether the chosen candidate meets every threshold (the export step runs only then).
        Which candidate was chosen, and every threshold that failed, are in the
        report and in the chosen model's metadata.
    """
    import shutil

    from kftune import evaluate as ev
    from kftune import report
    from kftune.errors import user_errors

    candidates = []
    for artifact in (baseline_eval, finetuned_eval, pruned_eval):
        with open(artifact.path) as f:
            candidates.append(ev.Evaluation.from_json(f.read()))
    with user_errors():
        gate = ev.GateConfig(min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop, max_size_bytes=max_size_bytes)
    decision = ev.choose(candidates, gate)
    source = {"baseline": baseline, "finetuned": finetuned, "pruned": pruned}[decision.chosen]
    shutil.copytree(source.path, chosen.path, dirs_exist_ok=True)
    winner = next(c for c in candidates if c.name == decision.chosen)
    reason = "; ".join(decision.reasons)
    chosen.metadata.update({"candidate": decision.chosen, "passed": decision.passed, "failed_thresholds": reason,
                            "accuracy": winner.accuracy, "gzip_bytes": winner.gzip_bytes})
    metrics.log_metric("chosen_accuracy", winner.accuracy)
    metrics.log_metric("chosen_gzip_bytes", winner.gzip_bytes)
    headers = ["candidate", "accuracy", f"top-{candidates[0].top_k}", "loss", "size (B)", "gzip (B)", "parameters",
               "latency b1 (ms)", "latency b32 (ms)", "gate"]
    rows = [[c.name, c.accuracy, c.top_k_accuracy, c.loss, c.size_bytes, c.gzip_bytes, c.parameters,
             c.latency_ms_batch1, c.latency_ms_batch32, "; ".join(gate.failures(c, candidates[0])) or "pass"]
            for c in candidates]
    fig, ax = report.pyplot().subplots(figsize=(6, 4))
    for c in candidates:
        ax.scatter(c.gzip_bytes / 1024, c.accuracy, s=60)
        ax.annotate(c.name, (c.gzip_bytes / 1024, c.accuracy), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("gzip size (KiB)")
    ax.set_ylabel("test accuracy")
    verdict = (f"<p class='pass'>Chosen: {decision.chosen}, passes every threshold.</p>" if decision.passed else
               f"<p class='fail'>No candidate passes; not exported. {'; '.join(decision.reasons)}</p>")
    with open(report_html.path, "w") as f:
        f.write(report.page("Candidates side by side", verdict, report.html_table(headers, rows), report.figure(fig)))
    if decision.passed:
        print(f"compare: chosen {decision.chosen}; it passes every threshold and will be exported")
    else:
        print(f"compare: NOT EXPORTED, no candidate passes the gate: {reason}")
    return decision.passed
