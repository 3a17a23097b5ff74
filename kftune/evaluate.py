"""Measuring candidate models on the held-out test split, comparing them, and gating.

Every candidate (the search winner, the fine-tuned model, the pruned model and
its quantized TFLite conversion) is measured the same way on the same test
split: accuracy, loss, top-k accuracy, per-class precision/recall/F1, the
confusion matrix, size on disk (raw and gzip), parameter count and latency.
:func:`choose` then applies the thresholds and picks what to export.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, measure, models
from kftune.errors import InputError


@dataclasses.dataclass
class Evaluation:
    """One candidate's measurements on one split."""

    name: str
    accuracy: float
    loss: float
    top_k: int
    top_k_accuracy: float
    class_names: list[str]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    confusion_matrix: list[list[int]]
    size_bytes: int
    gzip_bytes: int
    parameters: int
    latency_ms_batch1: float
    latency_ms_batch32: float
    examples: int
    # The file that was measured (model.keras, model_int8.tflite, ...): what serving loads.
    model_file: str = models.MODEL_FILE

    SCALARS = ("accuracy", "loss", "top_k_accuracy", "size_bytes", "gzip_bytes", "parameters",
               "latency_ms_batch1", "latency_ms_batch32")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Evaluation:
        return cls(**json.loads(text))

    def scalars(self) -> dict[str, float | int]:
        """The headline measurements, for metrics and export metadata (per-class figures: :func:`per_class_markdown`)."""
        return {key: getattr(self, key) for key in self.SCALARS}


def scores(labels, outputs, class_names: list[str]) -> dict:
    """Accuracy, top-k, per-class precision/recall/F1 and the confusion matrix of given outputs.

    ``outputs`` are a model's outputs: (N, classes) probabilities, or (N, 1)
    sigmoid outputs for a two-class model. Confusion-matrix rows are the true
    classes, columns the predicted ones. Top-k is top-3 (top-2 for three
    classes; plain accuracy for two).
    """
    import numpy as np
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    outputs = np.asarray(outputs)
    n = len(class_names)
    width = outputs.shape[-1] if outputs.ndim == 2 else None
    if width != n and not (n == 2 and width == 1):
        raise InputError(
            f"the model gives outputs of shape {outputs.shape[1:]} per image but the dataset has {n} classes "
            f"{class_names}: evaluate the model on the dataset it was trained for."
        )
    probabilities = models.class_probabilities(outputs)
    predicted = models.predict_classes(outputs)
    top_k = min(3, n - 1) if n > 2 else 1
    if top_k == 1:
        # A sigmoid output of exactly 0.5 is class 1 (models.predict_classes) though
        # both probabilities tie; top-1 must agree with the prediction.
        ranked = predicted[:, None]
    else:
        # Stable, so that tied probabilities rank the lower class id first, as argmax does.
        ranked = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=list(range(n)), zero_division=0
    )
    return {
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else 0.0,
        "top_k": top_k,
        "top_k_accuracy": float(np.mean((ranked == labels[:, None]).any(axis=-1))) if len(labels) else 0.0,
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "confusion_matrix": confusion_matrix(labels, predicted, labels=list(range(n))).tolist(),
    }


def _test_data(dataset_dir, split: str, model_path: Path, meta: models.ModelMeta | None):
    """The dataset's info and ``split`` as a stream of (image, label): never loaded whole."""
    info = dataset.DatasetInfo.load(dataset_dir)
    if meta is not None and list(meta.class_names) != list(info.class_names):
        raise InputError(
            f"model `{model_path}` was trained on classes {meta.class_names} but the dataset has "
            f"{info.class_names}: evaluate it on the dataset it was trained for."
        )
    data = dataset.load_split(dataset_dir, split)
    if not info.splits.get(split):
        raise InputError(f"the `{split}` split of `{dataset_dir}` is empty: ingest with a larger test_fraction.")
    return info, data


def _evaluation(name: str, class_names: list[str], runner, data) -> Evaluation:
    """Measures ``runner`` on ``data`` with :func:`kftune.measure.measured`, the way every step measures."""
    result, figures = measure.measured(runner, data)
    return Evaluation(
        name=name,
        class_names=list(class_names),
        examples=int(len(result.labels)),
        model_file=runner.path.name,
        **{**figures, **scores(result.labels, result.outputs, class_names)},
    )


def evaluate(name: str, model_dir: str | Path, dataset_dir: str | Path, split: str = "test") -> Evaluation:
    """Measures the Keras model in ``model_dir`` on ``split`` of the dataset."""
    model, meta = models.load(model_dir)
    path = Path(model_dir, models.MODEL_FILE)
    info, data = _test_data(dataset_dir, split, path, meta)
    models.check_fits(model, meta, info, path)
    return _evaluation(name, info.class_names, measure.KerasRunner(model, path), data)


def evaluate_candidate(name: str, model_dir: str | Path, dataset_dir: str | Path, tflite_file: str = "") -> Evaluation | None:
    """Measures the Keras model in ``model_dir``, or its ``tflite_file``.

    Returns None when ``tflite_file`` was not made (the prune step writes it only
    for the modes in its ``quantize`` parameter): then there is no such candidate.
    """
    if not tflite_file:
        return evaluate(name, model_dir, dataset_dir)
    path = Path(model_dir, tflite_file)
    if not path.exists():
        return None
    return evaluate_tflite(name, path, dataset_dir)


def read_evaluation(path: str | Path) -> Evaluation | None:
    """An evaluation written by the evaluate step; None for a candidate that was not made."""
    text = Path(path).read_text()
    if not text.strip():
        return None
    try:
        return Evaluation.from_json(text)
    except (ValueError, TypeError) as e:
        raise InputError(f"`{path}` is not an evaluation written by kftune's evaluate step ({e}): "
                         "connect the evaluate step's `evaluation` output.") from e


def evaluate_tflite(name: str, tflite_path: str | Path, dataset_dir: str | Path, split: str = "test") -> Evaluation:
    """Measures a TFLite model (float or quantized) on ``split`` of the dataset.

    When ``model.json`` sits beside the file (as in a kftune Model folder), its
    class names must match the dataset's.
    """
    runner = measure.TFLiteRunner(tflite_path)
    meta_path = runner.path.parent / models.META_FILE
    meta = models.ModelMeta(**json.loads(meta_path.read_text())) if meta_path.exists() else None
    info, data = _test_data(dataset_dir, split, runner.path, meta)
    return _evaluation(name, info.class_names, runner, data)


# ---------------------------------------------------------------- gate


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Thresholds a model must meet to be exported.

    Attributes:
        min_accuracy: Lowest acceptable test accuracy.
        max_accuracy_drop: Largest acceptable accuracy loss against the baseline
            (the search winner), in accuracy units (0.01 = one point).
        max_size_bytes: Largest acceptable gzip-compressed size; 0 for no limit.
    """

    min_accuracy: float = 0.0
    max_accuracy_drop: float = 0.01
    max_size_bytes: int = 0

    def __post_init__(self):
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise InputError(f"`min_accuracy` must be in [0, 1]. Received: min_accuracy={self.min_accuracy}")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise InputError(f"`max_accuracy_drop` must be in [0, 1]. Received: max_accuracy_drop={self.max_accuracy_drop}")
        if self.max_size_bytes < 0:
            raise InputError(f"`max_size_bytes` must be >= 0. Received: max_size_bytes={self.max_size_bytes}")

    def failures(self, candidate: Evaluation, baseline: Evaluation) -> list[str]:
        """Why ``candidate`` fails the gate, one line per threshold; empty when it passes."""
        out = []
        if candidate.accuracy < self.min_accuracy:
            out.append(f"{candidate.name}: accuracy {candidate.accuracy:.4f} < min_accuracy {self.min_accuracy}")
        drop = baseline.accuracy - candidate.accuracy
        if drop > self.max_accuracy_drop:
            out.append(
                f"{candidate.name}: accuracy drop {drop:.4f} against {baseline.name} > max_accuracy_drop {self.max_accuracy_drop}"
            )
        if self.max_size_bytes and candidate.gzip_bytes > self.max_size_bytes:
            out.append(f"{candidate.name}: gzip size {candidate.gzip_bytes} B > max_size_bytes {self.max_size_bytes}")
        return out


@dataclasses.dataclass
class Decision:
    """The outcome of the gate: which candidate, whether it passed, and every failed threshold."""

    chosen: str
    passed: bool
    reasons: list[str]

    def message(self) -> str:
        if self.passed:
            return f"chosen: {self.chosen}, the smallest candidate that passes every threshold; it will be exported."
        return (
            f"NOT EXPORTED: no candidate passes every threshold ({'; '.join(self.reasons)}). "
            f"The most accurate is {self.chosen}. Relax the named threshold or improve the model."
        )


def choose(candidates: list[Evaluation], gate: GateConfig) -> Decision:
    """Picks the smallest candidate (gzip size) that passes the gate.

    The first candidate is the baseline the accuracy drop is measured against.
    When none passes, the most accurate is named, with every failure.
    """
    if not candidates:
        raise InputError("there are no candidates to choose from: evaluate at least the baseline.")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise InputError(f"candidate names must differ, or the choice is ambiguous. Received: {names}")
    baseline = candidates[0]
    passing = [c for c in candidates if not gate.failures(c, baseline)]
    if passing:
        chosen = min(passing, key=lambda c: (c.gzip_bytes, -c.accuracy))
        return Decision(chosen.name, True, [])
    reasons = [r for c in candidates for r in gate.failures(c, baseline)]
    return Decision(max(candidates, key=lambda c: c.accuracy).name, False, reasons)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def _change(baseline: float, value: float) -> str:
    """The factor against the baseline, on its own line ("" for the baseline itself or no figure):
    what structured pruning gains in parameters and batch-32 latency, seen in the table itself."""
    if not baseline or not value or value == baseline:
        return ""
    return f"<br><small>{baseline / value:.2f}x {'fewer' if baseline > value else 'more'}</small>" \
        if isinstance(baseline, int) else \
        f"<br><small>{baseline / value:.2f}x {'faster' if baseline > value else 'slower'}</small>"


def comparison_html(candidates: list[Evaluation], gate: GateConfig, decision: Decision) -> str:
    """The comparison report for the Kubeflow UI: the verdict, every candidate side by side, and accuracy
    against size. Per-class figures are the evaluate step's ``per_class`` table (:func:`per_class_markdown`).

    Laid out for the Run UI's side pane (about 800 px wide): the gate's verdict is the second column and
    wraps within its cell; two-number cells (raw / gzip size, batch 1 / 32 latency) keep the table narrow.
    Parameters and batch-32 latency show their factor against the baseline (the first candidate) beneath.
    """
    from kftune import report

    baseline = candidates[0]
    head = ["candidate", "gate", "accuracy", f"top-{baseline.top_k}", "loss", "size KiB<br>raw / gzip",
            "parameters", "latency ms<br>batch 1 / 32"]
    cells = []
    for c in candidates:
        failures = gate.failures(c, baseline)
        # Each failure starts with the candidate's name, which the row already shows.
        verdict = ("<span class='fail'>fails</span><br>"
                   + "<br>".join(html.escape(f.removeprefix(f"{c.name}: ")) for f in failures)
                   if failures else "<span class='pass'>passes</span>")
        if c.name == decision.chosen:
            verdict += "<br><b>chosen</b>"
        cells.append([
            f"<b>{html.escape(c.name)}</b><br><small>{html.escape(c.model_file)}</small>", verdict,
            f"{c.accuracy:.4f}", f"{c.top_k_accuracy:.4f}", f"{c.loss:.4f}",
            f"{_kib(c.size_bytes)} / {_kib(c.gzip_bytes)}", f"{c.parameters:,}{_change(baseline.parameters, c.parameters)}",
            f"{c.latency_ms_batch1:.3g} / {c.latency_ms_batch32:.3g}"
            f"{_change(baseline.latency_ms_batch32, c.latency_ms_batch32)}",
        ])
    css = "pass" if decision.passed else "fail"
    thresholds = (f"min_accuracy={gate.min_accuracy}, max_accuracy_drop={gate.max_accuracy_drop} "
                  f"(against {baseline.name}), max_size_bytes={gate.max_size_bytes or 'no limit'}")
    return report.page(
        "Candidates side by side",
        f"<p class='{css}'>{html.escape(decision.message())}</p>",
        f"<p>Thresholds: {html.escape(thresholds)}. Measured on {baseline.examples} test images.</p>",
        report.html_table(head, cells, escape=False, css="compare"),
        report.figure(_size_plot(candidates, gate)),
    )


def _size_plot(candidates: list[Evaluation], gate: GateConfig):
    """Accuracy against gzip size, each point named inside the axes (labels turn inward near the edges)."""
    from kftune import report

    xs = [c.gzip_bytes / 1024 for c in candidates]
    ys = [c.accuracy for c in candidates]
    fig, ax = report.pyplot().subplots(figsize=(6.4, 4), layout="constrained")
    ax.scatter(xs, ys, s=60, zorder=3)
    if gate.max_size_bytes:
        ax.axvline(gate.max_size_bytes / 1024, color="#b00020", linestyle="--", label="max_size_bytes")
        xs = [*xs, gate.max_size_bytes / 1024]
    if gate.min_accuracy:
        ax.axhline(gate.min_accuracy, color="#b00020", linestyle=":", label="min_accuracy")
        ys = [*ys, gate.min_accuracy]
    # Room around the points for their names; the axes start at 0 KiB.
    x_span = max(xs) or 1.0
    y_lo, y_hi = min(ys), max(ys)
    y_pad = max((y_hi - y_lo) * 0.25, 0.01)
    ax.set_xlim(0, x_span * 1.15)
    ax.set_ylim(y_lo - y_pad, min(1.0, y_hi + y_pad) if y_hi < 1.0 else y_hi + y_pad)
    for c in candidates:
        x, y = c.gzip_bytes / 1024, c.accuracy
        right = x > x_span * 0.6
        top = y > y_hi - (y_hi - y_lo) * 0.2 and y_hi > y_lo
        ax.annotate(c.name, (x, y), textcoords="offset points", xytext=(-7 if right else 7, -12 if top else 7),
                    ha="right" if right else "left", va="top" if top else "bottom", fontsize=9)
    if gate.max_size_bytes or gate.min_accuracy:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("gzip size (KiB)")
    ax.set_ylabel("test accuracy")
    ax.set_title("accuracy against size")
    ax.grid(alpha=0.3)
    return fig


def per_class_markdown(chosen: Evaluation, candidates: list[Evaluation]) -> str:
    """Per-class figures beside the confusion matrix: the chosen candidate's precision, recall and F1
    with each class's test images, then every candidate's F1."""
    from kftune import report

    support = [sum(row) for row in chosen.confusion_matrix]
    rows = [[name, f"{chosen.precision[i]:.3f}", f"{chosen.recall[i]:.3f}", f"{chosen.f1[i]:.3f}", support[i]]
            for i, name in enumerate(chosen.class_names)]
    f1_rows = [[name, *(f"{c.f1[i]:.3f}" for c in candidates)] for i, name in enumerate(chosen.class_names)]
    return (
        f"## Per class: {chosen.name} (the confusion matrix's candidate)\n\n"
        + report.markdown_table(["class", "precision", "recall", "F1", "test images"], rows)
        + "\n## F1 per class, every candidate\n\n"
        + report.markdown_table(["class", *(c.name for c in candidates)], f1_rows)
    )


# The int8 TFLite file the prune step writes beside the pruned model, measured as the `quantized` candidate.
QUANTIZED_FILE = "model_int8.tflite"


def evaluate_and_choose(dataset_dir: str | Path, model_dirs: dict[str, str | Path], gate: GateConfig, *,
                        progress=print) -> tuple[list[Evaluation], Decision, dict[str, Path]]:
    """Scores every candidate on the same test split, then applies the gate.

    ``model_dirs`` maps candidate names to Model folders, the baseline first;
    the pruned folder's int8 TFLite file, when the prune step made one, is one
    more candidate (``quantized``). Returns the evaluations, the decision, and
    each candidate's Model folder.
    """
    candidates, folders = [], {}
    for name, folder in model_dirs.items():
        entries = [(name, "")] + ([("quantized", QUANTIZED_FILE)] if name == "pruned" else [])
        for candidate, tflite_file in entries:
            evaluation = evaluate_candidate(candidate, folder, dataset_dir, tflite_file)
            if evaluation is None:
                progress(f"evaluate: no {candidate} candidate: the prune step made no {tflite_file} "
                         "(its prune_quantize setting does not ask for int8)")
                continue
            progress(f"evaluate: {candidate} ({evaluation.model_file}) accuracy {evaluation.accuracy:.4f}, "
                     f"gzip {evaluation.gzip_bytes / 1024:.0f} KiB")
            candidates.append(evaluation)
            folders[candidate] = Path(folder)
    return candidates, choose(candidates, gate), folders


def gate_markdown(candidates: list[Evaluation], gate: GateConfig, decision: Decision) -> str:
    """Why nothing was exported: each candidate with the thresholds it missed (the gate's else branch)."""
    from kftune import report

    baseline = candidates[0]
    rows = [[c.name, f"{c.accuracy:.4f}", f"{c.gzip_bytes}", "<br>".join(gate.failures(c, baseline)) or "passes"]
            for c in candidates]
    return (
        "## Not exported: no candidate passed the gate\n\n"
        f"Thresholds: min_accuracy={gate.min_accuracy}, max_accuracy_drop={gate.max_accuracy_drop} "
        f"(against {baseline.name}), max_size_bytes={gate.max_size_bytes or 'no limit'}.\n\n"
        + report.markdown_table(["candidate", "test accuracy", "gzip bytes", "thresholds missed"], rows)
        + f"\n\nThe most accurate candidate is **{decision.chosen}**. Relax the threshold named above "
        "(min_accuracy, max_accuracy_drop, max_size_bytes) or improve the model, and run again.\n"
    )
