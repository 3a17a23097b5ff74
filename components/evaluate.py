"""Evaluate component: every candidate on the same test split in one pod, then the gate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components import KFTUNE_CPU_IMAGE, KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    baseline: Input[Model],
    finetuned: Input[Model],
    pruned: Input[Model],
    gate_config: str,
    chosen: Output[Model],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    per_class: Output[Markdown],
    evaluations: Output[dsl.Artifact],
) -> str:
    """Measures every candidate on the held-out test split and picks the one to export.

    The candidates are the search winner (the baseline the accuracy drop is
    measured against), the fine-tuned model, the pruned model and, when the
    prune step made it, its int8 TFLite file. The smallest (gzip size) that
    meets every threshold is chosen.

    Args:
        dataset: The dataset (its test split is used).
        baseline: The search winner.
        finetuned: The fine-tuned model.
        pruned: The pruned model (its folder also holds the TFLite files).
        gate_config: The gate's thresholds (from the validation step).
        chosen: Output: the chosen candidate's Model folder; its metadata names the
            candidate, the file measured, whether it passed and every failed threshold.
        report_html: Output: every candidate side by side, and accuracy against size.
        metrics: Output: each candidate's test accuracy and gzip size, the chosen one's headline
            figures (chosen_accuracy, chosen_loss, ..., chosen_latency_ms_batch32), and the gate's verdict.
        confusion: Output: the chosen candidate's confusion matrix, labelled with the class names.
        per_class: Output: the chosen candidate's precision, recall and F1 per class, and every candidate's F1.
        evaluations: Output: every measurement as JSON.

    Returns:
        "pass" when the chosen candidate meets every threshold (export runs only then), else "fail".
    """
    import json
    import shutil

    from kftune import evaluate as ev
    from kftune import parameters
    from kftune.errors import user_errors

    with user_errors():
        gate = parameters.load(ev.GateConfig, gate_config)
        candidates, decision, folders = ev.evaluate_and_choose(
            dataset.path, {"baseline": baseline.path, "finetuned": finetuned.path, "pruned": pruned.path}, gate)
    winner = next(c for c in candidates if c.name == decision.chosen)
    shutil.copytree(folders[winner.name], chosen.path, dirs_exist_ok=True)
    chosen.metadata.update({"candidate": winner.name, "model_file": winner.model_file, "passed": decision.passed,
                            "failed_thresholds": "; ".join(decision.reasons), "accuracy": winner.accuracy,
                            "gzip_bytes": winner.gzip_bytes, "metrics": winner.scalars()})
    for c in candidates:
        metrics.log_metric(f"{c.name}_accuracy", c.accuracy)
        metrics.log_metric(f"{c.name}_gzip_bytes", c.gzip_bytes)
    # The chosen candidate's headline figures, under one name across runs, for the UI's run comparison.
    for key, value in winner.scalars().items():
        metrics.log_metric(f"chosen_{key}", value)
    metrics.log_metric("gate_passed", int(decision.passed))
    confusion.log_confusion_matrix(winner.class_names, winner.confusion_matrix)
    with open(per_class.path, "w") as f:
        f.write(ev.per_class_markdown(winner, candidates))
    with open(evaluations.path, "w") as f:
        json.dump([json.loads(c.to_json()) for c in candidates], f, indent=1)
    with open(report_html.path, "w") as f:
        f.write(ev.comparison_html(candidates, gate, decision))
    print(f"evaluate: {decision.message()}")
    return "pass" if decision.passed else "fail"


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def gate_failed(
    evaluations: Input[dsl.Artifact], gate_config: str, report: Output[Markdown],
) -> NamedTuple("Published", [("exported_uri", str), ("chosen_candidate", str)]):
    """Records why nothing was exported: each candidate and the thresholds it missed.

    Args:
        evaluations: Every candidate's measurements (from evaluate).
        gate_config: The gate's thresholds (from the validation step).
        report: Output: the candidates and the thresholds each missed.

    Returns:
        An empty exported URI (nothing passed) and the most accurate candidate.
    """
    import json

    from kftune import evaluate as ev
    from kftune import parameters

    gate = parameters.load(ev.GateConfig, gate_config)
    with open(evaluations.path) as f:
        candidates = [ev.Evaluation(**values) for values in json.load(f)]
    decision = ev.choose(candidates, gate)
    with open(report.path, "w") as f:
        f.write(ev.gate_markdown(candidates, gate, decision))
    print(f"gate: {decision.message()}")
    return "", decision.chosen
