"""Magnitude pruning with tensorflow-model-optimization, measured before and after.

tfmot's ``prune_low_magnitude`` wraps layers, :class:`UpdatePruningStep` advances
the schedule while the model trains on, and ``strip_pruning`` removes the
wrappers for export. kftune picks the schedule from :class:`PruneConfig`,
prunes the whole model or chosen layer types, and measures what changed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow (and tfmot) is imported
from kftune import dataset, measure, models
from kftune.augment import AugmentSpec, training_batches
from kftune.errors import InputError

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "polynomial")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """How to prune.

    Attributes:
        target_sparsity: Share of weights set to zero, in [0, 1).
        schedule: ``constant`` (tfmot ConstantSparsity, the tutorial's) or
            ``polynomial`` (PolynomialDecay from ``initial_sparsity``).
        initial_sparsity: Start of the polynomial schedule.
        epochs: Epochs of training while pruning.
        begin_step: Step at which pruning starts.
        end_step: Step at which the polynomial schedule reaches the target;
            0 means the end of training.
        frequency: Prune every this many steps.
        layer_types: Comma-separated Keras layer class names to prune
            (``Conv2D,Dense``); empty prunes every prunable layer.
        m_by_n: ``2:4`` for structured M-by-N sparsity (tfmot's
            sparsity_m_by_n), which some hardware accelerates; empty for none.
        learning_rate: Learning rate of training while pruning.
        batch_size: 0 takes the fine-tuned model's.
        seed: Seeds shuffling and augmentation.
    """

    target_sparsity: float = 0.5
    schedule: str = "constant"
    initial_sparsity: float = 0.0
    epochs: int = 2
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 10
    layer_types: str = ""
    m_by_n: str = ""
    learning_rate: float = 1e-4
    batch_size: int = 0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.target_sparsity < 1.0:
            raise InputError(f"`target_sparsity` must be in [0, 1). Received: target_sparsity={self.target_sparsity}")
        if not 0.0 <= self.initial_sparsity <= self.target_sparsity:
            raise InputError(
                "`initial_sparsity` must be in [0, target_sparsity]. "
                f"Received: initial_sparsity={self.initial_sparsity}, target_sparsity={self.target_sparsity}"
            )
        if self.schedule not in SCHEDULES:
            raise InputError(f"`schedule` must be one of {SCHEDULES}. Received: schedule={self.schedule!r}")
        for name, low in (("epochs", 1), ("begin_step", 0), ("end_step", 0), ("frequency", 1), ("batch_size", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise InputError(f"`{name}` must be a whole number >= {low}. Received: {name}={value!r}")
        if self.m_by_n and self.m_by_n != "2:4":
            raise InputError(f"`m_by_n` must be empty or 2:4 (what tfmot supports). Received: m_by_n={self.m_by_n!r}")
        if not self.learning_rate > 0:
            raise InputError(f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate}")

    @property
    def layer_type_names(self) -> list[str]:
        return [t.strip() for t in self.layer_types.split(",") if t.strip()]


@dataclasses.dataclass
class PruneReport:
    """What pruning gained and lost."""

    before: dict
    after: dict
    sparsity: dict[str, float]
    history: dict


def _tfmot():
    import tensorflow_model_optimization as tfmot

    return tfmot


def _schedule(config: PruneConfig, end_step: int):
    sparsity = _tfmot().sparsity.keras
    if config.schedule == "constant":
        return sparsity.ConstantSparsity(config.target_sparsity, begin_step=config.begin_step, frequency=config.frequency)
    return sparsity.PolynomialDecay(
        initial_sparsity=config.initial_sparsity,
        final_sparsity=config.target_sparsity,
        begin_step=config.begin_step,
        end_step=max(end_step, config.begin_step + 1),
        frequency=config.frequency,
    )


def _wrap(model, config: PruneConfig, end_step: int):
    """Wraps the layers to prune; unprunable layers get an error naming them."""
    tfmot = _tfmot()
    k = models.keras()
    params = {"pruning_schedule": _schedule(config, end_step)}
    if config.m_by_n:
        params["sparsity_m_by_n"] = (2, 4)
    types = config.layer_type_names
    for name in types:
        if not hasattr(k.layers, name):
            raise InputError(f"`layer_types`: `{name}` is not a Keras layer class (e.g. Conv2D, Dense).")
    nested = [layer.name for layer in model.layers if isinstance(layer, k.Model)]
    if nested and not types:
        raise InputError(
            f"layer `{nested[0]}` is a nested model (a pretrained backbone), which tfmot cannot prune whole: "
            "set `layer_types` (for example Dense) to prune only those layers."
        )

    def clone(layer):
        if types and type(layer).__name__ not in types:
            return layer
        if isinstance(layer, k.Model) or not layer.trainable_weights:
            return layer  # nothing to prune (Rescaling, pooling, ...)
        try:
            return tfmot.sparsity.keras.prune_low_magnitude(layer, **params)
        except ValueError as e:
            raise InputError(
                f"layer `{layer.name}` ({type(layer).__name__}) cannot be pruned by tfmot: set `layer_types` to "
                "the layer classes to prune (for example Conv2D,Dense) to leave it dense."
            ) from e

    return k.models.clone_model(model, clone_function=clone)


def evaluate_split(model, images, labels, batch_size: int = 256) -> dict:
    loss, accuracy = model.evaluate(images.astype("float32"), labels, batch_size=batch_size, verbose=0)[:2]
    return {"loss": float(loss), "accuracy": float(accuracy)}


def prune(
    dataset_dir: str | Path,
    model_dir: str | Path,
    config: PruneConfig,
    output_dir: str | Path,
    *,
    progress: Callable[[str], None] = print,
    verbose: int = 2,
) -> PruneReport:
    """Prunes the model in ``model_dir`` while training on, strips it, saves it, and reports."""
    import tensorflow as tf

    tfmot = _tfmot()
    info = dataset.DatasetInfo.load(dataset_dir)
    model, meta = models.load(model_dir)
    hyper = dict(meta.hyperparameters) if meta else {}
    batch_size = config.batch_size or int(hyper.get("batch_size", 32))
    x_val, y_val = dataset.load_arrays(dataset_dir, "validation")
    steps = math.ceil(info.splits["train"] / batch_size) * config.epochs
    pruned = _wrap(model, config, config.end_step or steps)
    models.compile_model(model, info.num_classes, learning_rate=config.learning_rate)
    before = {**evaluate_split(model, x_val, y_val), **_sizes(model)}
    before["latency_ms"] = measure.latency_ms(model, x_val, batch_size=1)
    progress(f"prune: {config.schedule} schedule to {config.target_sparsity:.0%} sparsity over {steps} steps")
    models.compile_model(pruned, info.num_classes, learning_rate=config.learning_rate)
    tf.keras.utils.set_random_seed(config.seed)
    spec = AugmentSpec.from_dict(info.augment) if info.augment else None
    train = training_batches(dataset.load_split(dataset_dir, "train"), spec, batch_size, config.seed)
    history = pruned.fit(
        train,
        validation_data=(x_val.astype("float32"), y_val),
        epochs=config.epochs,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
        verbose=verbose,
    )
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    models.compile_model(stripped, info.num_classes, learning_rate=config.learning_rate)
    after = {**evaluate_split(stripped, x_val, y_val), **_sizes(stripped)}
    after["latency_ms"] = measure.latency_ms(stripped, x_val, batch_size=1)
    hyper["prune"] = dataclasses.asdict(config)
    models.save(
        stripped,
        output_dir,
        models.ModelMeta(family=meta.family if meta else "unknown", class_names=info.class_names,
                         input_shape=list(info.shape), hyperparameters=hyper, stage="pruned"),
    )
    return PruneReport(
        before=before,
        after=after,
        sparsity=measure.sparsity(stripped),
        history={k_: [float(v) for v in vals] for k_, vals in history.history.items()},
    )


def _sizes(model) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, models.MODEL_FILE)
        model.save(path)
        size = measure.file_size(path)
    return {"size_bytes": size.raw_bytes, "gzip_bytes": size.gzip_bytes}
