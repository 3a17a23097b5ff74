"""Measuring candidate models on the held-out test split, comparing them, and gating.

Every candidate (the search winner, the fine-tuned model, the pruned model) is
measured the same way on the same test split: accuracy, loss, top-k accuracy,
per-class precision/recall/F1, the confusion matrix, size on disk, parameter
count and latency. :func:`choose` then applies the thresholds and picks what
to export.
"""

from __future__ import annotations

import dataclasses
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Evaluation:
        return cls(**json.loads(text))


def scores(labels, outputs, class_names: list[str]) -> dict:
    """Accuracy, top-k, per-class precision/recall/F1 and the confusion matrix of given outputs."""
    import numpy as np
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = models.class_probabilities(outputs)
    predicted = probabilities.argmax(axis=-1)
    n = len(class_names)
    top_k = min(3, n - 1) if n > 2 else 1
    ranked = np.argsort(-probabilities, axis=-1)[:, :top_k]
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=list(range(n)), zero_division=0
    )
    return {
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else 0.0,
        "top_k": top_k,
        "top_k_accuracy": float(np.mean([label in row for label, row in zip(labels, ranked, strict=True)])) if len(labels) else 0.0,
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "confusion_matrix": confusion_matrix(labels, predicted, labels=list(range(n))).tolist(),
    }


def evaluate(name: str, model_dir: str | Path, dataset_dir: str | Path, split: str = "test") -> Evaluation:
    """Measures the model in ``model_dir`` on ``split`` of the dataset."""
    import numpy as np

    info = dataset.DatasetInfo.load(dataset_dir)
    model, meta = models.load(model_dir)
    if meta is not None and list(meta.class_names) != list(info.class_names):
        raise InputError(
            f"model `{model_dir}` was trained on classes {meta.class_names} but the dataset has "
            f"{info.class_names}: evaluate it on the dataset it was trained for."
        )
    images, labels = dataset.load_arrays(dataset_dir, split)
    if len(labels) == 0:
        raise InputError(f"the `{split}` split of `{dataset_dir}` is empty: ingest with a larger test_fraction.")
    outputs = model.predict(images.astype(np.float32), batch_size=256, verbose=0)
    # Cross-entropy from the probabilities: the same number as Keras' loss for both head shapes.
    probabilities = np.clip(models.class_probabilities(outputs), 1e-7, 1.0)
    loss = float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])))
    size = measure.file_size(Path(model_dir, models.MODEL_FILE))
    return Evaluation(
        name=name,
        loss=loss,
        class_names=list(info.class_names),
        size_bytes=size.raw_bytes,
        gzip_bytes=size.gzip_bytes,
        parameters=int(model.count_params()),
        latency_ms_batch1=measure.latency_ms(model, images, batch_size=1),
        latency_ms_batch32=measure.latency_ms(model, images, batch_size=32),
        examples=int(len(labels)),
        **scores(labels, outputs, info.class_names),
    )


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
        """Why ``candidate`` fails the gate; empty when it passes."""
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
    chosen: str
    passed: bool
    reasons: list[str]


def choose(candidates: list[Evaluation], gate: GateConfig) -> Decision:
    """Picks the smallest candidate (gzip size) that passes the gate.

    The first candidate is the baseline the accuracy drop is measured against.
    When none passes, the most accurate is named, with every failure.
    """
    baseline = candidates[0]
    passing = [c for c in candidates if not gate.failures(c, baseline)]
    if passing:
        chosen = min(passing, key=lambda c: (c.gzip_bytes, -c.accuracy))
        return Decision(chosen.name, True, [])
    reasons = [r for c in candidates for r in gate.failures(c, baseline)]
    return Decision(max(candidates, key=lambda c: c.accuracy).name, False, reasons)
