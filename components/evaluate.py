"""Evaluate and compare components: every candidate measured alike, then gated."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import KFTUNE_CPU_IMAGE, KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    name: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    tflite_file: str = "",
):
    """Measures one candidate on the held-out test split.

    Args:
        dataset: The dataset (its test split is used).
        model: The candidate's Model folder.
        name: The candidate's name in reports (baseline, finetuned, pruned, quantized).
        evaluation: Output: every measurement as JSON, for the compare step.
        metrics: Output: accuracy, loss, top-k, sizes, parameters, latency, per-class precision/recall/F1.
        confusion: Output: the confusion matrix, labelled with the class names.
        tflite_file: A TFLite file in the Model folder to measure instead of
            model.keras (e.g. model_int8.tflite); empty: the Keras model. When
            the file was not made, the step says so and writes an empty evaluation.
    """
    from kftune import evaluate as ev
    from kftune.errors import user_errors

    with user_errors():
        result = ev.evaluate_candidate(name, model.path, dataset.path, tflite_file)
    with open(evaluation.path, "w") as f:
        f.write(result.to_json() if result else "")
    if result is None:
        print(f"evaluate: no {name} candidate: the model folder holds no {tflite_file} "
              "(the prune step writes it only when its `quantize` parameter asks for it)")
        return
    for key, value in result.scalars().items():
        metrics.log_metric(key, value)
    for cls, precision, recall, f1 in zip(result.class_names, result.precision, result.recall, result.f1, strict=True):
        metrics.log_metric(f"precision_{cls}", precision)
        metrics.log_metric(f"recall_{cls}", recall)
        metrics.log_metric(f"f1_{cls}", f1)
    confusion.log_confusion_matrix(result.class_names, result.confusion_matrix)
    print(f"evaluate: {name} ({result.model_file}) accuracy={result.accuracy:.4f} gzip={result.gzip_bytes} B")


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
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
    quantized_eval: Input[Artifact] = None,
) -> bool:
    """Compares the candidates side by side and picks the one to export.

    The smallest candidate (gzip size) that meets every threshold is chosen.

    Args:
        baseline_eval: Evaluation of the search winner (the accuracy-drop reference).
        finetuned_eval: Evaluation of the fine-tuned model.
        pruned_eval: Evaluation of the pruned model.
        baseline: The search winner.
        finetuned: The fine-tuned model.
        pruned: The pruned model (its folder also holds the quantized TFLite files).
        chosen: Output: the chosen candidate's Model folder; its metadata names the
            candidate, the file it was measured as, whether it passed, and every failed threshold.
        report_html: Output: the comparison table and accuracy-vs-size plot.
        metrics: Output: the chosen candidate's accuracy and size.
        min_accuracy: Lowest acceptable test accuracy.
        max_accuracy_drop: Largest acceptable accuracy loss against the baseline (0.01 = 1 point).
        max_size_bytes: Largest acceptable gzip size in bytes; 0 for no limit.
        quantized_eval: Optional: evaluation of a TFLite file in the pruned model's folder.

    Returns:
        Whether the chosen candidate meets every threshold (the export step runs only then).
    """
    import shutil

    from kftune import evaluate as ev
    from kftune.errors import user_errors

    pairs = [(baseline_eval, baseline), (finetuned_eval, finetuned), (pruned_eval, pruned)]
    if quantized_eval is not None:
        pairs.append((quantized_eval, pruned))
    candidates, folders = [], {}
    with user_errors():
        for artifact, model in pairs:
            evaluation = ev.read_evaluation(artifact.path)
            if evaluation is not None:  # None: a candidate that was not made (no quantization asked for)
                candidates.append(evaluation)
                folders[evaluation.name] = model.path
        gate = ev.GateConfig(min_accuracy=min_accuracy, max_accuracy_drop=max_accuracy_drop, max_size_bytes=max_size_bytes)
        decision = ev.choose(candidates, gate)
    winner = next(c for c in candidates if c.name == decision.chosen)
    shutil.copytree(folders[winner.name], chosen.path, dirs_exist_ok=True)
    chosen.metadata.update({"candidate": winner.name, "model_file": winner.model_file, "passed": decision.passed,
                            "failed_thresholds": "; ".join(decision.reasons), "accuracy": winner.accuracy,
                            "gzip_bytes": winner.gzip_bytes, "metrics": winner.scalars()})
    metrics.log_metric("chosen_accuracy", winner.accuracy)
    metrics.log_metric("chosen_gzip_bytes", winner.gzip_bytes)
    metrics.log_metric("gate_passed", int(decision.passed))
    with open(report_html.path, "w") as f:
        f.write(ev.comparison_html(candidates, gate, decision))
    print(f"compare: {decision.message()}")
    return decision.passed
