"""Pruning, magnitude (tensorflow-model-optimization) or structured, measured before and after.

``prune_method=magnitude``: tfmot's ``prune_low_magnitude`` wraps layers,
:class:`UpdatePruningStep` advances the schedule while the model trains on, and
``strip_pruning`` removes the wrappers for export. kftune picks the schedule
from :class:`PruneConfig`, prunes the whole model or chosen layer types, and
measures what changed. The zeros stay in the file: it shrinks once compressed.

``prune_method=structured``: :mod:`kftune.structured` removes whole filters and
units and rebuilds a smaller dense model, which is then fine-tuned here: the
file is smaller as it is, and it runs faster in any runtime.

Beyond tfmot's own API, an accuracy budget: given ``prune_max_accuracy_drop``, kftune
bisects the sparsity levels and keeps the highest one whose validation accuracy
stays within the budget. The kept model can also be quantized to TFLite (see
:mod:`kftune.quantize`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow (and tfmot) is imported
from kftune import (
    dataset,
    distillation,
    measure,
    models,
    quantize,
    report,
    storage,
    structured,
    training,
)
from kftune.augment import AugmentSpec, training_batches
from kftune.errors import InputError, check_numbers, check_whole_numbers

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "polynomial")
METHODS = ("magnitude", "structured")
ALLOCATIONS = ("auto", "global", "uniform")
# Training images structured pruning's allocation measures each channel group's sensitivity on (one batch: the
# measurement is groups x 6 shares forward passes, 156 for MobileNetV2: about 2.5 minutes on 2 cores at 224 px).
SENSITIVITY_IMAGES = 32
# Training images the layers that lost input channels are refit on (structured.reconstruct: two forward passes
# per refit layer, about 3 minutes for MobileNetV2 at 224 px on 2 cores); the first SENSITIVITY_IMAGES of them
# are the sensitivity's.
RECONSTRUCT_IMAGES = 64


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_levels(text: str) -> list[float]:
    try:
        levels = sorted({float(v) for v in _split(text)})
    except ValueError:
        raise InputError(
            f"`prune_sparsity_levels` must be comma-separated numbers such as 0.5,0.8,0.9. Received: {text!r}"
        ) from None
    for level in levels:
        if not 0.0 <= level < 1.0:
            raise InputError(f"every sparsity in `prune_sparsity_levels` must be in [0, 1). Received: {level}")
    return levels


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """How to prune.

    Attributes:
        prune_method: ``magnitude`` (tfmot: weights set to zero, the file shrinks
            once compressed) or ``structured`` (whole Conv2D filters and Dense
            units removed and a smaller dense model rebuilt, the layers that lost
            inputs refit by least squares to the dense model's outputs on 64
            training images, then fine-tuned: smaller and faster as it is; layers
            that cannot shrink are named in the report).
        target_sparsity: Share of weights set to zero (magnitude), or of the
            shrinkable filters and units removed (structured; see
            ``prune_allocation``), in [0, 1).
        prune_schedule: ``polynomial`` (PolynomialDecay from ``prune_initial_sparsity``,
            which recovers best in the measurements) or ``constant`` (tfmot
            ConstantSparsity, the tutorial's).
        prune_initial_sparsity: Start of the polynomial schedule.
        prune_epochs: Epochs of training while pruning (structured: of fine-tuning the rebuilt model).
        prune_begin_step: Step at which pruning starts.
        prune_end_step: Step at which pruning ends (the polynomial schedule reaches
            the target there); 0 means the last pruning step of training.
        prune_frequency: Prune every this many steps.
        prune_layer_types: Comma-separated Keras layer class names to prune
            (``Conv2D,Dense``); empty prunes every prunable layer, a
            keras.applications base's trainable layers included (magnitude:
            the base is inlined, and the model handed on flat).
        prune_allocation: How ``target_sparsity`` is shared: ``auto`` (the
            default) is ``global`` for magnitude and ``uniform`` for structured,
            what recovers best in the measurements of each. Magnitude:
            ``global`` (one magnitude threshold over the kernels of the Conv2D and
            Dense layers that no BatchNormalization follows, taken before pruning:
            large, redundant layers lose more weights, small ones fewer; every
            other pruned layer goes to the target) or ``uniform`` (every layer to
            the target, as tfmot's tutorial does); an m:n pattern is per layer and
            ignores it. Structured: ``uniform`` (that share of every group) or
            ``global`` (each group loses the share, at most 85%, that its measured
            sensitivity allows: how much removing it alone changes the outputs on
            32 training images; the most sensitive stay whole, and as those are
            the early, high-resolution ones, the model gets less faster).
        prune_m_by_n: ``2:4`` for M-by-N sparsity (tfmot's sparsity_m_by_n),
            which some hardware accelerates; empty for none. It zeroes exactly 2 of
            every 4 weights along a kernel's input axis, so it needs
            ``target_sparsity`` 0.5; a layer whose input axis is not a multiple of 4
            is left dense (the report names it).
        prune_learning_rate: Learning rate of training while pruning.
        batch_size: 0 takes the fine-tuned model's.
        seed: Seeds shuffling and augmentation.
        prune_quantize: Comma-separated TFLite post-training quantization modes to
            export beside the pruned model: ``dynamic`` (int8 weights of the larger
            kernels, activations float) and/or
            ``int8`` (full integer, calibrated on the validation split); empty
            for none.
        prune_max_accuracy_drop: 0 prunes to ``target_sparsity``. Above 0, the
            accuracy budget (0.01 = one point of validation accuracy): kftune
            bisects ``prune_sparsity_levels`` (a level within the budget sends the
            search higher, one over it lower) and keeps the highest level found
            within it; ``target_sparsity`` is then not used.
        prune_sparsity_levels: The levels the budget search tries, comma-separated.
        prune_distill_weight: 0 trains the pruned model on the labels alone. Above 0,
            knowledge distillation: the share of the loss taken from the fine-tuned
            model's soft labels, (1 - w) * cross-entropy(labels) + w * T^2 *
            KL(teacher || student), both softened by ``prune_distill_temperature``.
        prune_distill_temperature: The distillation temperature T (above 1 softens
            the teacher's probabilities, so the student learns how it ranks the
            wrong classes too).
        checkpoint_uri: Folder or gs:// prefix of the run's checkpoints (the pipeline's
            ``checkpoint_uri``, shared with fine-tune): each level's training is
            checkpointed every epoch under ``prune/<key>/`` (:func:`checkpoint_location`),
            so a retried pod resumes the level it was training and does not train the
            levels it finished again; empty: a temporary folder, nothing resumes.
    """

    prune_method: str = "magnitude"
    target_sparsity: float = 0.5
    # Defaults measured (bench/bench_prune.py --sweep, docs/benchmarks.md): polynomial over 8 epochs at 1e-3
    # lost 0.74 points at 80% sparsity where the tutorial's constant schedule over 2 epochs at 1e-4 lost 21.
    prune_schedule: str = "polynomial"
    prune_initial_sparsity: float = 0.0
    prune_epochs: int = 8
    prune_begin_step: int = 0
    prune_end_step: int = 0
    prune_frequency: int = 10
    prune_layer_types: str = ""
    # Measured (bench/bench_prune.py --sweep): at 90% over 4 seeds, 0.55 points lost on average with one
    # global threshold against 1.49 with every layer at 90%.
    prune_allocation: str = "auto"
    prune_m_by_n: str = ""
    prune_learning_rate: float = 1e-3
    batch_size: int = 0
    seed: int = 0
    prune_quantize: str = "int8"
    prune_max_accuracy_drop: float = 0.0
    prune_sparsity_levels: str = "0.5,0.7,0.8,0.85,0.9,0.93,0.95"
    prune_distill_weight: float = 0.0
    prune_distill_temperature: float = 4.0
    checkpoint_uri: str = ""

    def __post_init__(self):
        if self.checkpoint_uri:
            storage.check_location(self.checkpoint_uri, "checkpoint_uri")
        check_numbers(self, ("target_sparsity", "prune_initial_sparsity", "prune_learning_rate", "prune_max_accuracy_drop",
                             "prune_distill_weight", "prune_distill_temperature"))
        if not 0.0 <= self.prune_distill_weight <= 1.0:
            raise InputError("`prune_distill_weight` must be in [0, 1] (0: labels alone, 1: the teacher's soft labels "
                             f"alone). Received: prune_distill_weight={self.prune_distill_weight}")
        if not 0.0 < self.prune_distill_temperature <= 100.0:
            raise InputError("`prune_distill_temperature` must be in (0, 100] (4 is usual). "
                             f"Received: prune_distill_temperature={self.prune_distill_temperature}")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise InputError(f"`target_sparsity` must be in [0, 1). Received: target_sparsity={self.target_sparsity}")
        if self.prune_method not in METHODS:
            raise InputError(f"`prune_method` must be one of {METHODS}. Received: prune_method={self.prune_method!r}")
        if self.prune_allocation not in ALLOCATIONS:
            raise InputError(f"`prune_allocation` must be one of {ALLOCATIONS}. "
                             f"Received: prune_allocation={self.prune_allocation!r}")
        if self.prune_schedule not in SCHEDULES:
            raise InputError(f"`prune_schedule` must be one of {SCHEDULES}. Received: prune_schedule={self.prune_schedule!r}")
        check_whole_numbers(self, {"prune_epochs": 1, "prune_begin_step": 0, "prune_end_step": 0, "prune_frequency": 1, "batch_size": 0})
        if self.prune_epochs > 10_000:
            raise InputError(f"`prune_epochs` must be at most 10000. Received: prune_epochs={self.prune_epochs}")
        if self.prune_end_step and self.prune_end_step <= self.prune_begin_step:
            raise InputError(
                "`prune_end_step` must be after `prune_begin_step`, or 0 for the end of training. "
                f"Received: prune_begin_step={self.prune_begin_step}, prune_end_step={self.prune_end_step}"
            )
        if not self.prune_learning_rate > 0:
            raise InputError(f"`prune_learning_rate` must be > 0. Received: prune_learning_rate={self.prune_learning_rate}")
        if not 0.0 <= self.prune_max_accuracy_drop < 1.0:
            raise InputError(
                f"`prune_max_accuracy_drop` must be in [0, 1) (0.01 = one point; 0 turns the search off). "
                f"Received: prune_max_accuracy_drop={self.prune_max_accuracy_drop}"
            )
        # Parsed even with the search off, so a bad ladder fails here rather than when the search is turned on.
        ladder = _parse_levels(self.prune_sparsity_levels)
        if self.prune_max_accuracy_drop > 0 and not ladder:
            raise InputError("`prune_sparsity_levels` is empty: give the levels the accuracy-budget search tries, e.g. 0.5,0.8,0.9.")
        for level in self.levels:
            if not 0.0 <= self.prune_initial_sparsity <= level:
                raise InputError(
                    "`prune_initial_sparsity` must be in [0, target sparsity]. "
                    f"Received: prune_initial_sparsity={self.prune_initial_sparsity}, target sparsity={level}"
                )
        self._check_m_by_n()
        quantize.check_modes(self.quantize_modes)
        self._check_layer_types()

    def _check_m_by_n(self):
        if not self.prune_m_by_n:
            return
        if self.prune_method == "structured":
            raise InputError("`prune_m_by_n` is a magnitude-pruning pattern: set prune_method=magnitude, or leave "
                             "prune_m_by_n empty for structured pruning.")
        if self.prune_m_by_n != "2:4":
            raise InputError(f"`prune_m_by_n` must be empty or 2:4 (what tfmot supports). Received: prune_m_by_n={self.prune_m_by_n!r}")
        if self.prune_max_accuracy_drop > 0:
            raise InputError("`prune_m_by_n`=2:4 fixes sparsity at 50%, so there is nothing to search: set prune_max_accuracy_drop=0.")
        if self.target_sparsity != 0.5:
            raise InputError(
                "`prune_m_by_n`=2:4 zeroes exactly 2 of every 4 weights: set target_sparsity=0.5. "
                f"Received: target_sparsity={self.target_sparsity}"
            )

    def _check_layer_types(self):
        if not self.layer_type_names:
            return
        # Imported only here, so that reading the default config (as the pipeline compiler does) stays light.
        layers = models.keras().layers
        for name in self.layer_type_names:
            cls = getattr(layers, name, None)
            if not (isinstance(cls, type) and issubclass(cls, layers.Layer)):
                raise InputError(
                    f"`prune_layer_types`: `{name}` is not a Keras layer class; give class names such as Conv2D,Dense."
                )

    @property
    def layer_type_names(self) -> list[str]:
        return _split(self.prune_layer_types)

    @property
    def quantize_modes(self) -> list[str]:
        return _split(self.prune_quantize)

    @property
    def allocation(self) -> str:
        """``prune_allocation`` with ``auto`` resolved for the method."""
        if self.prune_allocation != "auto":
            return self.prune_allocation
        return "uniform" if self.prune_method == "structured" else "global"

    @property
    def levels(self) -> list[float]:
        """The sparsities to prune to: the search's ladder, or just the target."""
        return _parse_levels(self.prune_sparsity_levels) if self.prune_max_accuracy_drop > 0 else [self.target_sparsity]


@dataclasses.dataclass
class PruneReport:
    """What pruning gained and lost, measured on the validation split.

    Attributes:
        before: The dense model: accuracy, loss, size_bytes, gzip_bytes, parameters,
            latency_ms_batch1 and latency_ms_batch32 (:func:`kftune.measure.measured`).
        after: The same for the pruned, stripped (or, structured, rebuilt) model.
        sparsity: Share of zeros per layer kernel of the stripped model, and ``overall``.
        history: Training history of the kept pruning run.
        target_sparsity: The sparsity (structured: share of filters and units removed) of the kept model.
        attempts: One entry per level pruned to, in the order tried: sparsity, accuracy, accuracy_drop,
            within_budget.
        max_accuracy_drop: The accuracy budget; 0 when there was no search.
        tflite: Per quantization mode: file, the same figures as ``before``, and
            float_kernels (the kernels the converter left in float32).
        method: The prune_method.
        layer_patterns: Per layer with weights, what it got: ``2:4``, a sparsity, ``structured: 64 -> 32
            filters``, or ``left whole: <why>`` / ``dense: <why>``.
        groups: Structured: per group of channels that go together, [block, producers, channels kept, why]
            (:meth:`kftune.structured.Plan.blocks`).
        distill_weight: The distillation weight the pruned model was trained with (0: labels alone).
        unknown_layers: Structured: the layers the channel analysis does not know, and why; each is left
            whole with the channels it touches.
    """

    before: dict
    after: dict
    sparsity: dict[str, float]
    history: dict
    target_sparsity: float = 0.0
    attempts: list[dict] = dataclasses.field(default_factory=list)
    max_accuracy_drop: float = 0.0
    tflite: dict[str, dict] = dataclasses.field(default_factory=dict)
    method: str = "magnitude"
    layer_patterns: dict[str, str] = dataclasses.field(default_factory=dict)
    groups: list[list] = dataclasses.field(default_factory=list)
    distill_weight: float = 0.0
    unknown_layers: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def within_budget(self) -> bool | None:
        """Whether the kept model meets the accuracy budget; None without a budget."""
        if self.max_accuracy_drop <= 0:
            return None
        return self.before["accuracy"] - self.after["accuracy"] <= self.max_accuracy_drop

    def metrics(self) -> dict[str, float]:
        """Flat scalars for the Kubeflow Metrics artifact."""
        out = {f"{when}_{key}": value for when, values in (("before", self.before), ("after", self.after))
               for key, value in values.items()}
        out["sparsity"] = self.sparsity["overall"]
        out["target_sparsity"] = self.target_sparsity
        out["accuracy_drop"] = self.before["accuracy"] - self.after["accuracy"]
        out["gzip_ratio"] = self.before["gzip_bytes"] / self.after["gzip_bytes"]
        out["size_ratio"] = self.before["size_bytes"] / self.after["size_bytes"]
        for mode, values in self.tflite.items():
            out.update({f"tflite_{mode}_{key}": value for key, value in values.items()
                        if isinstance(value, int | float) and not isinstance(value, bool)})
            out[f"tflite_{mode}_gzip_ratio"] = self.before["gzip_bytes"] / values["gzip_bytes"]
            out[f"tflite_{mode}_size_ratio"] = self.before["size_bytes"] / values["size_bytes"]
        if self.within_budget is not None:
            out["max_accuracy_drop"] = self.max_accuracy_drop
            out["within_budget"] = float(self.within_budget)
            out["levels_tried"] = float(len(self.attempts))
        return out

    def _tables(self) -> list[tuple[str, list[str], list[list]]]:
        kept = (f"structured {self.target_sparsity:.0%} narrower" if self.method == "structured"
                else f"pruned {self.target_sparsity:.0%}")
        rows = [["dense (Keras)", *self._row(self.before, self.before)],
                [f"{kept} (Keras)", *self._row(self.after, self.before)]]
        rows += [[f"{kept} + {mode} ({values['file']})", *self._row(values, self.before)]
                 for mode, values in self.tflite.items()]
        tables = [("Validation split", ["model", "accuracy", "loss", "parameters", "raw bytes", "gzip bytes",
                                        "dense raw / raw", "dense gzip / gzip", "latency ms (batch 1)",
                                        "latency ms (batch 32)"], rows)]
        if self.max_accuracy_drop > 0:
            tables.append((
                f"Accuracy budget: at most {self.max_accuracy_drop * 100:.3g} point(s) lost",
                ["sparsity" if self.method == "magnitude" else "filters and units removed", "accuracy",
                 "drop vs dense", "within budget"],
                [[f"{a['sparsity']:.0%}", a["accuracy"], a["accuracy_drop"], "yes" if a["within_budget"] else "no"]
                 for a in self.attempts],
            ))
        if self.groups:
            tables.append(("Per block: channels kept and why", ["block", "producing layers", "channels kept", "why"],
                           self.groups))
        tables.append(("Per layer: what it got, and the share of zeros in its kernel", ["layer", "pattern", "sparsity"],
                       [[name, self.layer_patterns.get(name, "" if name == "overall" else "not pruned"), f"{value:.2%}"]
                        for name, value in self.sparsity.items()]))
        return tables

    @staticmethod
    def _row(values: dict, dense: dict) -> list:
        return [values["accuracy"], values["loss"], values["parameters"], values["size_bytes"],
                values["gzip_bytes"], f"{dense['size_bytes'] / values['size_bytes']:.2f}x",
                f"{dense['gzip_bytes'] / values['gzip_bytes']:.2f}x", values["latency_ms_batch1"],
                values["latency_ms_batch32"]]

    def _notes(self) -> list[str]:
        if self.method == "structured":
            notes = [
                f"Structured pruning removed whole filters and units: the Keras file is an ordinary dense model of "
                f"{self.after['parameters']} parameters against {self.before['parameters']} "
                f"({self.before['size_bytes'] / self.after['size_bytes']:.2f}x smaller raw, no sparse runtime needed), "
                f"and runs at {self.after['latency_ms_batch32']:.3g} ms per batch of 32 against "
                f"{self.before['latency_ms_batch32']:.3g}. Channels that must go together (through Add, Multiply, "
                f"depthwise and BatchNormalization layers, a nested base included) went as groups, ranked by "
                f"{structured.IMPORTANCE}; groups left whole and layers the analysis does not know are named "
                "in the per-block and per-layer tables. Before fine-tuning, each layer that lost input channels "
                f"was refit by least squares to the dense model's outputs on up to {RECONSTRUCT_IMAGES} training "
                "images, so that training starts from the dense model's function rather than a damaged one."]
        else:
            notes = [self._magnitude_note()]
        for mode, values in self.tflite.items():
            if values.get("float_kernels"):
                notes.append(f"{mode}: the TFLite converter left these kernels in float32 (it quantizes only the "
                             f"larger ones): {', '.join(values['float_kernels'])}.")
        if self.unknown_layers:
            notes.append("Left whole, with the channels they touch, because structured pruning does not know what "
                         "they do with channels: " + "; ".join(f"`{name}` ({why})"
                                                              for name, why in self.unknown_layers.items()) + ".")
        if self.distill_weight > 0:
            notes.append(f"The pruned model was trained against the fine-tuned model's soft labels (distillation "
                         f"weight {self.distill_weight}).")
        return notes + self._search_notes()

    def _magnitude_note(self) -> str:
        return (
            f"The pruned Keras file is as large as the dense one ({self.after['size_bytes']} against "
            f"{self.before['size_bytes']} bytes): pruning sets weights to zero but keeps them. The saving shows "
            f"once the file is compressed ({self.before['gzip_bytes'] / self.after['gzip_bytes']:.2f}x smaller "
            "with gzip) or in a runtime that stores sparse tensors. Keras latency does not fall either: a dense "
            "kernel multiplies zeros as fast as any other number. prune_method=structured removes whole filters "
            "and units instead."
        )

    def _search_notes(self) -> list[str]:
        notes = []
        if self.tflite:
            notes.append("The TFLite files are quantized after pruning; they are measured with "
                         "the TFLite interpreter on the validation split (which also calibrated int8). Compare "
                         "latencies within one runtime, not Keras against TFLite.")
        if self.within_budget is False:
            notes.append(f"No level tried stayed within the budget: the lowest, {self.target_sparsity:.0%}, "
                         "was kept. Add lower levels to `prune_sparsity_levels` or raise `prune_max_accuracy_drop`.")
        elif self.within_budget:
            notes.append(f"Kept: {self.target_sparsity:.0%}, the highest level tried within the budget.")
        return notes

    def title(self) -> str:
        if self.method == "structured":
            return f"Structured pruning: {self.target_sparsity:.0%} of filters and units removed"
        return f"Pruning to {self.target_sparsity:.0%} sparsity"

    def markdown(self) -> str:
        parts = [f"# {self.title()}"]
        for heading, headers, rows in self._tables():
            parts += [f"## {heading}", report.markdown_table(headers, rows)]
        parts += self._notes()
        return "\n\n".join(parts) + "\n"

    def html(self) -> str:
        import html

        parts = []
        for heading, headers, rows in self._tables():
            parts += [f"<h3>{html.escape(heading)}</h3>", report.html_table(headers, rows)]
        parts += [f"<p>{html.escape(note)}</p>" for note in self._notes()]
        return report.page(self.title(), *parts)


def _tfmot():
    import tensorflow_model_optimization as tfmot

    return tfmot


def _schedule(config: PruneConfig, end_step: int):
    sparsity = _tfmot().sparsity.keras
    if config.prune_schedule == "constant":
        return sparsity.ConstantSparsity(
            config.target_sparsity, begin_step=config.prune_begin_step, end_step=end_step, frequency=config.prune_frequency
        )
    return sparsity.PolynomialDecay(
        initial_sparsity=config.prune_initial_sparsity,
        final_sparsity=config.target_sparsity,
        begin_step=config.prune_begin_step,
        end_step=end_step,
        frequency=config.prune_frequency,
    )


# Pruning turns a schedule gets when a small training split leaves fewer steps than `prune_frequency`.
SMALL_DATA_TURNS = 4


def _fit_frequency(config: PruneConfig, steps: int, progress: Callable[[str], None]) -> PruneConfig:
    """``config``, pruning more often when its frequency leaves no pruning turn in ``steps`` training steps.

    The default frequency (10) suits training splits of hundreds of batches; a
    small split (8 batches of 120 images at prune_epochs=1) would otherwise stop
    the step after search and fine-tune have spent their GPU time. A schedule
    that starts late (``prune_begin_step``) is the user's own and is left to
    :func:`end_step`'s refusal.
    """
    if config.prune_method != "magnitude" or config.prune_begin_step or config.prune_frequency <= steps:
        return config
    frequency = max(1, steps // SMALL_DATA_TURNS)
    progress(f"prune: {steps} training steps are too few to prune every {config.prune_frequency} "
             f"(prune_frequency): pruning every {frequency} step(s) instead, {steps // frequency} turns")
    return dataclasses.replace(config, prune_frequency=frequency)


def end_step(config: PruneConfig, steps: int) -> int:
    """The step pruning ends at: ``config.prune_end_step``, or the last pruning turn of ``steps`` training steps.

    tfmot prunes only on steps ``begin_step + k * frequency`` (counting from 1), so
    a polynomial schedule must end on one of them to reach its target.
    """
    last = config.prune_begin_step + (steps - config.prune_begin_step) // config.prune_frequency * config.prune_frequency
    if last <= config.prune_begin_step or last < 1:
        raise InputError(
            f"`prune_begin_step`={config.prune_begin_step} and `prune_frequency`={config.prune_frequency} leave no pruning step in the "
            f"{steps} training steps: lower them, or raise `prune_epochs`."
        )
    if config.prune_end_step > steps:
        raise InputError(
            f"`prune_end_step`={config.prune_end_step} is past the end of training ({steps} steps), so the target sparsity "
            "would never be reached: lower it, set 0 for the end of training, or raise `prune_epochs`."
        )
    return config.prune_end_step or last


# tfmot's m:n groups run along a kernel's input axis (second to last: Dense (in, out), Conv2D (h, w, in, out)).
M_BY_N = (2, 4)


def _m_by_n_misfit(layer) -> str | None:
    """Why tfmot's 2:4 would not be 2:4 on ``layer`` (it pads a short group, zeroing 1 of 3), or None."""
    kernels = [w for w in layer.trainable_weights if w.shape.rank in (2, 4)]
    if not kernels:
        return "no rank-2 or rank-4 kernel"
    size = int(kernels[0].shape[-2])
    if size % M_BY_N[1]:
        return f"its input axis ({size}) is not a multiple of {M_BY_N[1]}"
    return None


# A layer's share of zeros under the global threshold is capped here: tfmot needs a final sparsity below 1,
# and a layer left with nothing would cut the network.
MAX_LAYER_SPARSITY = 0.99


def _comparable(model, layers) -> list:
    """The layers whose kernel magnitudes one global threshold may compare.

    Conv2D and Dense, whose one pruned weight is their kernel, and only where no
    BatchNormalization reads their output: a normalized layer's scale is arbitrary
    (its kernel can shrink tenfold and compute the same), so its magnitudes say
    nothing against another layer's. The others are pruned to the target each,
    so that all together still reach it.
    """
    k = models.keras()
    try:
        readers = structured.consumers(model)
    except InputError:
        return []  # a subclassed model: no graph to read (tfmot's clone refuses it anyway)
    names = {layer.name: type(layer).__name__ for layer in model.layers}
    return [layer for layer in layers
            if type(layer) in (k.layers.Conv2D, k.layers.Dense)
            and not any(names.get(reader) == "BatchNormalization" for reader in readers.get(layer.name, []))]


def global_shares(layers, target: float) -> dict[str, float]:
    """Each layer's sparsity under one magnitude threshold across the kernels of ``layers``.

    The threshold is the ``target`` quantile of all their kernel weights' magnitudes,
    so the layers together reach ``target`` while a large, redundant layer (small_cnn's
    Flatten->Dense) is pruned harder than a small one that every image passes
    through (the first convolution). Layers whose weights are not named kernels
    (Embedding, ...) are left out and pruned to ``target`` each.
    """
    import numpy as np

    kernels = {layer.name: np.abs(values) for layer in layers if (values := measure.kernel_values(layer)) is not None}
    if not kernels:
        return {}
    threshold = np.quantile(np.concatenate(list(kernels.values())), target)
    return {name: float(min(MAX_LAYER_SPARSITY, np.mean(values <= threshold))) for name, values in kernels.items()}


def _wrap(model, config: PruneConfig, end: int, patterns: dict[str, str] | None = None):
    """Wraps the layers to prune; unprunable layers get an error naming them.

    ``patterns`` (if given) receives, per layer with weights, what it gets.
    """
    patterns = {} if patterns is None else patterns
    tfmot = _tfmot()
    k = models.keras()
    types = config.layer_type_names
    if not types and any(isinstance(layer, k.Model) for layer in model.layers):
        # tfmot cannot wrap a nested model (a keras.applications base): every layer to prune means the base's
        # layers too, so the base is inlined (the same layers, weights and outputs) and handed on flat.
        model = structured.flat(model)
    if types and not any(type(layer).__name__ in types for layer in model.layers):
        present = sorted({type(layer).__name__ for layer in model.layers})
        raise InputError(f"`prune_layer_types`={config.prune_layer_types} matches no layer of the model; it has: {', '.join(present)}.")

    def left_whole(layer) -> str | None:
        """Why ``layer`` is not wrapped ("" for a layer without weights), or None when it is."""
        if types and type(layer).__name__ not in types:
            return f"not pruned: {type(layer).__name__} is not in prune_layer_types" if layer.weights else ""
        if isinstance(layer, k.Model) or not layer.trainable_weights:
            # Nothing to prune (Rescaling, pooling, ...), a frozen layer, or a nested model.
            return ("not pruned: " + ("a nested model" if isinstance(layer, k.Model) else "frozen")) if layer.weights else ""
        if config.prune_m_by_n and (misfit := _m_by_n_misfit(layer)):
            return f"dense: {misfit}, so 2:4 does not apply"
        return None

    shares = {}
    if config.allocation == "global" and not config.prune_m_by_n:
        shares = global_shares(_comparable(model, [layer for layer in model.layers if left_whole(layer) is None]),
                               config.target_sparsity)

    def clone(layer):
        reason = left_whole(layer)
        if reason is not None:
            if reason:
                patterns[layer.name] = reason
            return layer
        params = {"pruning_schedule": _schedule(config, end)}
        if config.prune_m_by_n:
            params["sparsity_m_by_n"] = M_BY_N
            patterns[layer.name] = config.prune_m_by_n
        elif layer.name in shares:
            share = shares[layer.name]
            own = dataclasses.replace(config, target_sparsity=share,
                                      prune_initial_sparsity=min(config.prune_initial_sparsity, share))
            params["pruning_schedule"] = _schedule(own, end)
            patterns[layer.name] = f"{config.prune_schedule} {share:.0%} (global threshold)"
        else:
            patterns[layer.name] = f"{config.prune_schedule} {config.target_sparsity:.0%}"
        try:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, **params)
        except ValueError as e:
            raise InputError(
                f"layer `{layer.name}` ({type(layer).__name__}) cannot be pruned by tfmot: set `prune_layer_types` to "
                "the layer classes to prune (for example Conv2D,Dense) to leave it dense, or give the layer "
                "tfmot's PrunableLayer interface (get_prunable_weights)."
            ) from e

    pruned = k.models.clone_model(model, clone_function=clone)
    _name_what_tfmot_leaves(pruned, patterns)
    return pruned


def _name_what_tfmot_leaves(pruned, patterns: dict[str, str]) -> None:
    """Corrects ``patterns`` where tfmot wrapped a layer but prunes less of it than its kernels.

    tfmot 0.8.1 wraps a DepthwiseConv2D and prunes none of its weights, and prunes only a
    SeparableConv2D's pointwise kernel; the report must not claim the schedule for them.
    """
    for wrapper in pruned.layers:
        layer = getattr(wrapper, "layer", None)
        if not hasattr(wrapper, "pruning_vars") or layer is None or layer.name not in patterns:
            continue
        pruned_names = {weight.name for weight, _, _ in wrapper.pruning_vars}
        left = [w.name.rsplit("/", 1)[-1].split(":")[0] for w in layer.weights
                if "kernel" in w.name and "bias" not in w.name and w.name not in pruned_names]
        if not pruned_names:
            patterns[layer.name] = f"not pruned: tfmot prunes no weight of a {type(layer).__name__}"
        elif left:
            patterns[layer.name] += f"; {', '.join(left)} left dense (tfmot prunes only the rest)"


def _tflite_kernel_shape(layer) -> tuple | None:
    """The shape TFLite stores ``layer``'s kernel in: (out, h, w, in) for Conv2D, (out, in) for Dense."""
    kernel = getattr(layer, "kernel", None) if type(layer).__name__ in ("Conv2D", "Dense") else None
    if kernel is None:
        return None
    shape = tuple(int(d) for d in kernel.shape)
    return (shape[-1], *shape[:-1]) if len(shape) == 4 else (shape[1], shape[0])


def float_kernels(model, path: str | Path) -> list[str]:
    """The Conv2D and Dense kernels the TFLite file ``path`` stores in float32, read from its tensors.

    Dynamic-range quantization quantizes only kernels above the converter's size
    threshold (1024 values) and leaves the smaller ones in float32, so "int8
    weights" is true of the large kernels only; this names the others.
    """
    import numpy as np

    tensors = measure.TFLiteRunner(path).interpreter.get_tensor_details()
    left = []
    for layer in measure.leaf_layers(model):
        shape = _tflite_kernel_shape(layer)
        matches = [t for t in tensors if f"/{layer.name}/" in t["name"] and tuple(t["shape"]) == shape]
        if any(t["dtype"] == np.float32 for t in matches):
            left.append(layer.name)
    return left


def _measured(model, data, path: Path | None = None) -> dict:
    """Validation figures of ``model`` (:func:`kftune.measure.measured`); sizes and latency only with its file ``path``."""
    return measure.measured(measure.KerasRunner(model, path), data)[1]


def checkpoint_location(config: PruneConfig, dataset_dir: str | Path, model_dir: str | Path) -> str:
    """Where this prune's checkpoints go: ``<checkpoint_uri>/prune/<key>``, or "" without a ``checkpoint_uri``.

    The key (:func:`kftune.training.checkpoint_location`) hashes the settings that
    shape a level's training, the dataset's fingerprint and the model's content:
    a retried pod finds its own checkpoints, and a rerun with the same
    ``checkpoint_uri`` but other settings, data or model trains in a folder of
    its own, so nothing it stored is resumed into the wrong model or replaced.
    Each level is its own fit in that folder,
    so a rerun that only changes the levels, the budget or the quantization
    (:data:`NOT_IN_A_LEVEL`) reuses the levels it already trained.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_A_LEVEL}
    return training.checkpoint_location(config.checkpoint_uri, "prune", settings, dataset_dir, model_dir)


# Settings that choose among levels or act after training: a level's training does not depend on them.
NOT_IN_A_LEVEL = ("checkpoint_uri", "target_sparsity", "prune_max_accuracy_drop", "prune_sparsity_levels",
                  "prune_quantize")
# The measured sensitivity (prune_allocation=global for structured pruning), beside the levels' checkpoints.
SENSITIVITY_FILE = "sensitivity.json"


def _fit_name(level: float) -> str:
    """The training.fit name of one level's training in the checkpoint folder."""
    return f"level{level:.4f}"


@dataclasses.dataclass
class _Run:
    """What every pruning attempt shares: the data, the training length and the checkpoint folder."""

    dataset_dir: Path
    model_dir: Path
    info: dataset.DatasetInfo
    batch_size: int
    end_step: int
    verbose: int
    checkpoint_dir: Path
    progress: Callable[[str], None] = print
    after_epoch: Callable[[], None] | None = None
    # The levels whose training was finished before this call (their weights read from the checkpoint folder).
    reused: set[float] = dataclasses.field(default_factory=set)
    # Measured once per prune() (on the same model and images whatever the level), when structured pruning
    # shares channels among groups by it (prune_allocation=global).
    sensitivity: structured.Sensitivity | None = None
    images: np.ndarray | None = None

    def training_images(self, count: int) -> np.ndarray:
        """The first ``count`` training images (as ingested, without augmentation), read once per prune()."""
        if self.images is None:
            self.images = np.concatenate([b[0].numpy() for b in dataset.batches(
                dataset.load_split(self.dataset_dir, "train").take(RECONSTRUCT_IMAGES))])
        return self.images[:count]

    def shares(self, config: PruneConfig) -> dict[str, float]:
        """Per channel group, the share structured pruning removes at ``config.target_sparsity``."""
        # Kept with the checkpoints: a restarted step must shrink each level to the architecture its checkpoint
        # holds, which a measurement repeated on another device could change by a rounding at a threshold.
        stored = self.checkpoint_dir / SENSITIVITY_FILE
        if self.sensitivity is None and stored.exists():
            saved = json.loads(stored.read_text())
            self.sensitivity = structured.Sensitivity(tuple(saved["levels"]),
                                                      {k: tuple(v) for k, v in saved["change"].items()},
                                                      saved["widths"])
        if self.sensitivity is None:
            images = self.training_images(SENSITIVITY_IMAGES)
            self.progress(f"prune: measuring each channel group's sensitivity on {len(images)} training images")
            self.sensitivity = structured.sensitivity(models.load(self.model_dir)[0], images,
                                                      config.layer_type_names, progress=self.progress)
            storage.write_atomically(stored, json.dumps(dataclasses.asdict(self.sensitivity)))
        return structured.allocate(self.sensitivity, config.target_sparsity)

    def refit(self, original, shrunk, plan: structured.Plan) -> None:
        """Refits the shrunk model's layers that lost input channels to the original's outputs
        (:func:`kftune.structured.reconstruct`), saying how far their outputs were and are from the original's."""
        images = self.training_images(RECONSTRUCT_IMAGES)
        refits = structured.reconstruct(original, shrunk, plan, images, progress=lambda line: self.progress(f"prune: {line}"))
        if refits:
            self.progress(
                f"prune: refit {len(refits)} layer{'s' if len(refits) > 1 else ''} that lost input channels to the dense model's outputs on "
                f"{len(images)} training images (least squares): relative error of their outputs "
                f"{np.mean([r.before for r in refits]):.3f} with the removed channels dropped, "
                f"{np.mean([r.after for r in refits]):.3f} refit (mean over the layers)")

    @property
    def validation(self):
        """The validation split, streamed from its shards."""
        return dataset.load_split(self.dataset_dir, "validation")

    def prune_to(self, config: PruneConfig):
        """Prunes a fresh copy of the model while training on; returns (stripped model, history, patterns,
        per-block rows, layers structured pruning does not know)."""
        import tensorflow as tf

        # A fresh copy each time: tfmot's wrappers share the original layers' weights.
        model, _ = models.load(self.model_dir)
        patterns: dict[str, str] = {}
        blocks: list[list] = []
        unknown: dict[str, str] = {}
        name = _fit_name(config.target_sparsity)
        resumed = training.started(self.checkpoint_dir, name)
        if training.finished(self.checkpoint_dir, name) is not None:
            self.reused.add(config.target_sparsity)
            self.progress(f"prune: {config.target_sparsity:.0%} was trained before (a retried pod, or a rerun with "
                          "the same checkpoint_uri): measured from its checkpoint, not trained again")
        elif resumed:
            self.progress(f"prune: {config.target_sparsity:.0%} resumes from its checkpoint after epoch "
                          f"{training.epochs_done(self.checkpoint_dir, name)} of {config.prune_epochs}")
        if config.prune_method == "structured":
            shares = self.shares(config) if config.allocation == "global" else None
            pruned, plan = structured.shrink(model, config.target_sparsity, config.layer_type_names, shares)
            if not resumed:  # the checkpoint holds the refit weights, and what training made of them
                self.refit(model, pruned, plan)
            structured.unfreeze_shrunk(pruned, plan)
            patterns, blocks, unknown = plan.describe(), plan.blocks(), plan.unknown
            callbacks = []
        else:
            pruned = _wrap(model, config, self.end_step, patterns)
            callbacks = [_tfmot().sparsity.keras.UpdatePruningStep()]
        models.compile_model(pruned, self.info.num_classes, learning_rate=config.prune_learning_rate)
        tf.keras.utils.set_random_seed(config.seed)
        spec = AugmentSpec.from_dict(self.info.augment) if self.info.augment else None
        train = training_batches(dataset.epoch_split(self.dataset_dir, "train"), spec, self.batch_size, config.seed)
        validation = dataset.batches(dataset.epoch_split(self.dataset_dir, "validation"))
        if config.prune_distill_weight > 0:
            teacher, _ = models.load(self.model_dir)
            teacher.trainable = False
            train, validation = distillation.with_teacher(train, teacher), distillation.with_teacher(validation, teacher)
            distillation.compile_student(pruned, self.info.num_classes, config.prune_learning_rate,
                                         config.prune_distill_weight, config.prune_distill_temperature)
        # The one training path (kftune.training): a level trained to the end is not trained again, one killed
        # part-way resumes from its last finished epoch.
        history = training.fit(pruned, name, train, self.checkpoint_dir, epochs=config.prune_epochs,
                               validation=validation, callbacks=callbacks, after_epoch=self.after_epoch,
                               verbose=self.verbose)
        stripped = pruned if config.prune_method == "structured" else _tfmot().sparsity.keras.strip_pruning(pruned)
        models.compile_model(stripped, self.info.num_classes, learning_rate=config.prune_learning_rate)
        return stripped, history, patterns, blocks, unknown


def prune(
    dataset_dir: str | Path,
    model_dir: str | Path,
    config: PruneConfig,
    output_dir: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    after_epoch: Callable[[], None] | None = None,
    progress: Callable[[str], None] = print,
    verbose: int = 2,
) -> PruneReport:
    """Prunes the model in ``model_dir`` while training on, strips it, saves it to ``output_dir``, and reports.

    With ``config.prune_max_accuracy_drop`` set, bisects ``config.levels`` and keeps
    the highest sparsity found within the budget. ``output_dir`` receives the model
    (``model.keras`` + ``model.json``) and one ``model_<mode>.tflite`` per quantize mode.

    ``checkpoint_dir`` (:func:`checkpoint_location`'s folder, mirrored) keeps each
    level's training, checkpointed every epoch: run again with the same folder after
    a kill, and the levels already trained are measured from their weights, the one
    being trained resumes from its last finished epoch. None: a temporary folder.
    ``after_epoch`` is called after each epoch's checkpoint is written (the upload).
    """
    if checkpoint_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kftune-prune-") as temporary:
            return prune(dataset_dir, model_dir, config, output_dir, checkpoint_dir=temporary, progress=progress,
                         verbose=verbose)

    info = dataset.DatasetInfo.load(dataset_dir)
    dense, meta = models.load(model_dir)
    models.check_fits(dense, meta, info, model_dir)
    hyper = dict(meta.hyperparameters) if meta else {}
    batch_size = config.batch_size or int(hyper.get("batch_size", 32))
    steps = math.ceil(info.splits["train"] / batch_size) * config.prune_epochs
    config = _fit_frequency(config, steps, progress)
    if not info.splits.get("validation"):
        raise InputError(f"the validation split of `{dataset_dir}` is empty: ingest with a larger validation_fraction.")
    # The schedule's end step is tfmot's; structured pruning trains on whatever the number of steps.
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    run = _Run(Path(dataset_dir), Path(model_dir), info, batch_size,
               end_step(config, steps) if config.prune_method == "magnitude" else steps, verbose, Path(checkpoint_dir),
               progress, after_epoch)
    # Fails fast, naming any layer tfmot cannot prune (or a model structured pruning cannot rebuild),
    # before measuring or training anything.
    if config.prune_method == "structured":
        the_plan, _ = structured.plan(dense, config.target_sparsity, config.layer_type_names)
        if not the_plan.keep:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in the_plan.whole.items())
            raise InputError(
                f"structured pruning finds no layer it can shrink in `{model_dir}` ({reasons}): name the layer kinds "
                "to shrink in prune_layer_types (Conv2D,Dense), or use prune_method=magnitude.")
        ranked = [g for g in the_plan.groups if g.criterion == "BN |gamma|" and len(g.keep) < g.width]
        if the_plan.unranked and len(the_plan.unranked) * 2 > len(ranked):
            progress(f"prune: warning: {len(the_plan.unranked)} of {len(ranked)} channel groups (first: "
                     f"{the_plan.unranked[0]}): {structured.UNRANKED}; expect a large accuracy drop. Prune a "
                     "model whose base has pretrained weights (fine-tune's `weights`: imagenet or a weights file).")
    else:
        # On a copy: the clone shares the layers it leaves unpruned with the model it wraps.
        _wrap(models.load(model_dir)[0], config, run.end_step)

    models.compile_model(dense, info.num_classes, learning_rate=config.prune_learning_rate)
    before = _measured(dense, run.validation, Path(model_dir, models.MODEL_FILE))
    searching = config.prune_max_accuracy_drop > 0
    attempts, results, fits = [], {}, {}

    def attempt(index: int) -> bool:
        level = config.levels[index]
        level_config = dataclasses.replace(config, target_sparsity=level)
        what = ("filters and units removed" if config.prune_method == "structured"
                else f"sparsity ({config.prune_schedule} schedule)")
        progress(f"prune: {config.prune_method} to {level:.0%} {what} over {steps} steps")
        stripped, history, patterns, blocks, unknown = run.prune_to(level_config)
        scores = _measured(stripped, run.validation)
        drop = before["accuracy"] - scores["accuracy"]
        within = drop <= config.prune_max_accuracy_drop if searching else None
        attempts.append({"sparsity": level, "accuracy": scores["accuracy"], "accuracy_drop": drop, "within_budget": within})
        if searching:
            progress(f"prune: {level:.0%}: validation accuracy {scores['accuracy']:.4f}, drop {drop:.4f}"
                     f" ({'within' if within else 'over'} the budget of {config.prune_max_accuracy_drop}"
                     f"{'; trained before, read from its checkpoint' if level in run.reused else ''})")
        results[index], fits[index] = (level_config, stripped, history, patterns, blocks, unknown), bool(within)
        # Only two attempts can still be handed on: the highest within the budget so far, and the lowest
        # tried (kept when none fits). The others' models go now: with a backbone each is a full copy of it.
        keep = {min(results)} | {max((i for i in results if fits[i]), default=min(results))}
        for other in set(results) - keep:
            del results[other]
        return bool(within)

    if not searching:
        attempt(0)
        kept = results[0]
    else:
        # Bisection over the ladder: accuracy falls as sparsity rises, so a level within the budget means
        # every lower one is too (and the search goes higher), one over it means every higher one is over.
        low, high = -1, len(config.levels)  # highest index known within, lowest known over
        while high - low > 1:
            middle = (low + high) // 2
            if attempt(middle):
                low = middle
            else:
                high = middle
        kept = results[low] if low >= 0 else results[min(results)]
    kept_config, stripped, history, patterns, blocks, unknown = kept

    output_dir = Path(output_dir)
    sparsity = measure.sparsity(stripped)
    hyper["prune"] = {**dataclasses.asdict(kept_config), "allocation": kept_config.allocation,
                    "measured_sparsity": sparsity["overall"]}
    models.save(
        stripped,
        output_dir,
        models.ModelMeta(family=meta.family if meta else "unknown", class_names=info.class_names,
                         input_shape=list(info.shape), hyperparameters=hyper, stage="pruned"),
    )
    after = _measured(stripped, run.validation, output_dir / models.MODEL_FILE)
    if config.quantize_modes:
        progress(f"prune: quantizing to TFLite ({config.prune_quantize})")
    tflite = quantize.quantize(stripped, config.quantize_modes, output_dir, run.validation)
    for values in tflite.values():
        values["float_kernels"] = float_kernels(stripped, output_dir / values["file"])
    return PruneReport(
        before=before,
        after=after,
        sparsity=sparsity,
        history=history,
        target_sparsity=kept_config.target_sparsity,
        attempts=attempts,
        max_accuracy_drop=config.prune_max_accuracy_drop,
        tflite=tflite,
        method=config.prune_method,
        layer_patterns=patterns,
        groups=blocks,
        unknown_layers=unknown,
        distill_weight=config.prune_distill_weight,
    )
