"""Fine-tuning: train a new head on a frozen pretrained backbone, then unfreeze gradually.

Two ways in:

* ``backbone=""`` continues training the search winner (the baseline model)
  on the full training split, with early stopping: the search ran each trial
  for a few epochs only.
* ``backbone`` one of :data:`kftune.models.BACKBONES`: phase 1 trains a new
  head on the frozen base; phase 2 unfreezes the top ``unfreeze_layers`` of the
  base in ``unfreeze_steps`` steps at ``learning_rate * finetune_lr_factor``,
  keeping BatchNormalization layers frozen and in inference mode.

Every phase is one :func:`kftune.training.fit` under ``checkpoint_dir``
(per-epoch checkpoint, done-marker), so a process killed mid-training and
started again resumes from the last finished epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, models, storage, training
from kftune.augment import AugmentSpec, training_batches
from kftune.errors import InputError, check_numbers, check_whole_numbers


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune.

    Attributes:
        backbone: "" to continue training the search winner, or one of
            vgg16, mobilenet_v2, efficientnet_b0, resnet50.
        weights: For a backbone: ``imagenet`` (downloaded by Keras, needs
            internet), a weights file path or ``gs://`` URI (for clusters without
            internet), or ``none`` (random initialisation).
        finetune_epochs: Epochs of the head phase (or of the continued training).
        unfreeze_epochs: Epochs of each unfreezing step.
        unfreeze_layers: How many of the base's top layers end up trainable.
        unfreeze_steps: In how many steps they are unfrozen.
        finetune_learning_rate: Head learning rate; 0 takes the search's best.
        finetune_lr_factor: Unfreezing steps train at learning_rate times this.
        batch_size: 0 takes the search's best.
        backbone_input_size: Backbone input size; 0 keeps the dataset's (at least 32).
        patience: Early stopping patience (epochs without better val_accuracy).
        seed: Seeds shuffling, augmentation and initialisation.
        checkpoint_uri: Folder or gs:// prefix for the per-epoch checkpoints of
            fine-tune and prune (in finetune/ and prune/, one folder per settings,
            dataset and starting model); a retried pod, or a rerun with the same one
            that starts from the same model, resumes, and any other run trains apart.
            Empty: under the pipeline root, per run.
    """

    backbone: str = ""
    weights: str = "imagenet"
    finetune_epochs: int = 10
    unfreeze_epochs: int = 3
    unfreeze_layers: int = 20
    unfreeze_steps: int = 2
    finetune_learning_rate: float = 0.0
    finetune_lr_factor: float = 0.1
    batch_size: int = 0
    backbone_input_size: int = 0
    patience: int = 3
    seed: int = 0
    checkpoint_uri: str = ""

    def __post_init__(self):
        check_numbers(self, ("finetune_learning_rate", "finetune_lr_factor"))
        if self.backbone and self.backbone not in models.BACKBONES:
            raise InputError(
                f"`backbone` must be empty (fine-tune the search winner) or one of {sorted(models.BACKBONES)}. "
                f"Received: backbone={self.backbone!r}"
            )
        check_whole_numbers(self, {"finetune_epochs": 1, "unfreeze_epochs": 0, "unfreeze_layers": 0, "unfreeze_steps": 1,
                                   "batch_size": 0, "backbone_input_size": 0, "patience": 1})
        if self.finetune_learning_rate < 0 or not 0 < self.finetune_lr_factor <= 1:
            raise InputError(
                "`finetune_learning_rate` must be >= 0 (0: the search's best) and `finetune_lr_factor` in (0, 1]. "
                f"Received: finetune_learning_rate={self.finetune_learning_rate}, finetune_lr_factor={self.finetune_lr_factor}"
            )
        for name, most in (("backbone_input_size", 1024), ("finetune_epochs", 10_000), ("unfreeze_epochs", 10_000),
                           ("unfreeze_steps", 100), ("patience", 10_000)):
            if getattr(self, name) > most:
                raise InputError(f"`{name}` must be at most {most}. Received: {name}={getattr(self, name)}")
        if 0 < self.backbone_input_size < 32:
            raise InputError("`backbone_input_size` must be 0 (the dataset's size) or at least 32, the smallest "
                             f"keras.applications accepts. Received: backbone_input_size={self.backbone_input_size}")
        if self.checkpoint_uri:
            storage.check_location(self.checkpoint_uri, "checkpoint_uri")
        if self.weights not in ("imagenet", "none", ""):
            storage.check_location(self.weights, "weights")
        if self.backbone and not self.weights:
            raise InputError("`weights` is empty: give imagenet, a weights file or gs:// URI, or none.")


@dataclasses.dataclass
class FinetuneResult:
    """Per-phase histories (``{"phase": ..., "history": {metric: [per epoch]}}``)."""

    phases: list[dict]
    hyperparameters: dict

    @property
    def final(self) -> dict:
        history = self.phases[-1]["history"]
        return {k: v[-1] for k, v in history.items() if v}


def _resolve_weights(config: FinetuneConfig, workdir: Path) -> str | None:
    """Where the base's weights come from; fails fast, before any training."""
    if not config.backbone or config.weights == "none":
        return None
    if config.weights == "imagenet":
        spec = models.BACKBONES[config.backbone]
        constructor = getattr(models.keras().applications, spec.constructor)
        try:
            constructor(include_top=False, weights="imagenet", **({"alpha": spec.alpha} if spec.alpha else {}))
        except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
            raise InputError(
                f"could not download ImageNet weights for {config.backbone} ({type(e).__name__}); "
                "this cluster may have no internet: set `weights` to a weights file or gs:// URI "
                "(base.save_weights('base.h5') on a machine with internet), or to `none`."
            ) from e
        return "imagenet"
    return str(storage.fetch(config.weights, workdir))


def check_weights_file(config: FinetuneConfig, image_size: int) -> None:
    """Fails, naming the file and what to do, where ``weights`` is a file that ``backbone``'s base cannot load.

    The validation step calls it, so that a wrong file stops the run on a CPU pod, before the search,
    instead of failing the fine-tune step on a GPU node (which the backend retries, to no avail).
    """
    if not config.backbone or config.weights in ("imagenet", "none", ""):
        return
    with tempfile.TemporaryDirectory(prefix="kftune-weights-") as workdir:
        path = storage.fetch(config.weights, workdir)
        size = max(config.backbone_input_size or image_size, models.BACKBONES[config.backbone].min_size)
        models.backbone_classifier(config.backbone, (size, size, 3), 2, weights=str(path))


FINGERPRINT_FILE = "fingerprint.json"


def checkpoint_location(config: FinetuneConfig, dataset_dir: str | Path, baseline_dir: str | Path) -> str:
    """Where this fine-tune's checkpoints go: ``<checkpoint_uri>/finetune/<key>``, or "" without a ``checkpoint_uri``.

    The key (:func:`kftune.training.checkpoint_location`) hashes the settings, the
    dataset's fingerprint and the baseline's content: a retried pod, or a rerun
    that starts from the same baseline, data and settings, resumes; any other
    run trains in a folder of its own, beside the first one's checkpoints.
    """
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_uri"}
    return training.checkpoint_location(config.checkpoint_uri, "finetune", settings, dataset_dir, baseline_dir)


def _bind_checkpoints(checkpoint_dir: Path, config: FinetuneConfig, info, baseline_dir: Path) -> None:
    """Ties the checkpoints in ``checkpoint_dir`` to the settings, the data and the baseline that made them.

    A rerun with the same ``checkpoint_uri`` resumes only where all three are the
    same; anything else would skip training and publish another run's weights.
    """
    mine = {
        "settings": {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_uri"},
        "data_fingerprint": info.fingerprint,
        "baseline": models.content_fingerprint(baseline_dir),
    }
    path = checkpoint_dir / FINGERPRINT_FILE
    if not path.exists():
        if any(checkpoint_dir.iterdir()):
            raise InputError(f"`checkpoint_uri` `{config.checkpoint_uri or checkpoint_dir}` already holds files that no "
                             "kftune fine-tune bound to its settings: give an empty or new checkpoint_uri.")
        storage.write_atomically(path, json.dumps(mine, sort_keys=True))  # a kill mid-write must not block resuming
        return
    stored = json.loads(path.read_text())
    if stored == json.loads(json.dumps(mine)):
        return
    changed = [f"{k}: {stored.get('settings', {}).get(k)!r} -> {v!r}" for k, v in mine["settings"].items()
               if stored.get("settings", {}).get(k) != v]
    if stored.get("data_fingerprint") != mine["data_fingerprint"]:
        changed.append("the dataset")
    if stored.get("baseline") != mine["baseline"]:
        changed.append("the baseline model")
    raise InputError(
        f"`checkpoint_uri` `{config.checkpoint_uri or checkpoint_dir}` holds checkpoints of another fine-tune "
        f"({'; '.join(changed)}): resuming would publish that run's weights. Give a new checkpoint_uri "
        "(or leave it empty for one per run), or delete the old checkpoints."
    )


def _devices():
    """The distribution strategy and dtype policy for this pod's devices.

    All GPUs of one pod are used through MirroredStrategy, with mixed precision
    (float16 compute, float32 variables) where there is a GPU; on the CPU
    nothing changes.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return tf.distribute.get_strategy(), "float32"
    return tf.distribute.MirroredStrategy(), "mixed_float16"


def finetune(
    dataset_dir: str | Path,
    baseline_dir: str | Path,
    config: FinetuneConfig,
    output_dir: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
    after_epoch: Callable[[], None] | None = None,
    progress: Callable[[str], None] = print,
    verbose: int = 2,
) -> FinetuneResult:
    """Fine-tunes and saves the model (and a SavedModel for serving) to ``output_dir``.

    ``checkpoint_dir`` keeps per-epoch checkpoints: run again with the same
    folder after a kill, and training resumes from the last finished epoch.
    ``after_epoch`` is called once each epoch's checkpoint is written (the
    component uploads the folder there).
    """
    import tensorflow as tf

    k = models.keras()
    info = dataset.DatasetInfo.load(dataset_dir)
    baseline, meta = models.load(baseline_dir)
    if not config.backbone:
        # Continued training keeps the baseline's head: it must fit this dataset.
        models.check_fits(baseline, meta, info, baseline_dir)
    hyper = dict(meta.hyperparameters) if meta else {}
    lr = config.finetune_learning_rate or float(hyper.get("learning_rate", 1e-3))
    batch_size = config.batch_size or int(hyper.get("batch_size", 32))
    hyper.update({"learning_rate": lr, "batch_size": batch_size})
    with tempfile.TemporaryDirectory() as workdir:
        weights = _resolve_weights(config, Path(workdir))
        checkpoint_dir = Path(checkpoint_dir or os.path.join(workdir, "checkpoints"))
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _bind_checkpoints(checkpoint_dir, config, info, Path(baseline_dir))
        tf.keras.utils.set_random_seed(config.seed)
        strategy, policy = _devices()
        progress(f"fine-tune: {strategy.num_replicas_in_sync} replica(s), {policy} precision")
        spec = AugmentSpec.from_dict(info.augment) if info.augment else None
        # Both splits are read every epoch: from memory after the first when small, else from the shards.
        train = training_batches(dataset.epoch_split(dataset_dir, "train"), spec, batch_size, config.seed)
        val = dataset.batches(dataset.epoch_split(dataset_dir, "validation"))
        callbacks = [k.callbacks.EarlyStopping("val_accuracy", patience=config.patience, restore_best_weights=True)]
        if tensorboard_dir:
            callbacks.append(k.callbacks.TensorBoard(str(tensorboard_dir)))

        def fit(model, name, epochs):
            # A phase already finished (a retried pod) is not trained again: its weights are loaded.
            return training.fit(model, name, train, checkpoint_dir, epochs=epochs, validation=val, callbacks=callbacks,
                                after_epoch=after_epoch, verbose=verbose)

        phases = []
        if not config.backbone:
            # The search winner keeps the dtype it was saved with.
            with strategy.scope():
                model = baseline if strategy.num_replicas_in_sync == 1 else models.load(baseline_dir)[0]
                models.compile_model(model, info.num_classes, optimizer=hyper.get("optimizer", "adam"),
                                     learning_rate=lr, momentum=hyper.get("momentum", 0.0))
            progress(f"fine-tune: continuing the search winner for up to {config.finetune_epochs} epochs (lr={lr:g})")
            phases.append({"phase": "continue", "history": fit(model, "continue", config.finetune_epochs)})
            family = meta.family if meta else "unknown"
        else:
            k.mixed_precision.set_global_policy(policy)
            try:
                with strategy.scope():
                    model, base = models.backbone_classifier(
                        config.backbone, info.shape, info.num_classes, weights=weights, input_size=config.backbone_input_size,
                        dense_units=int(hyper.get("dense_units", 256)), dropout=float(hyper.get("dropout", 0.2)),
                    )
                    models.compile_model(model, info.num_classes, learning_rate=lr)
            finally:
                k.mixed_precision.set_global_policy("float32")
            progress(f"fine-tune: phase 1, new head on frozen {config.backbone} ({weights or 'random'} weights), "
                     f"{config.finetune_epochs} epochs")
            phases.append({"phase": "head", "history": fit(model, "head", config.finetune_epochs)})
            candidates = [layer for layer in base.layers
                          if not isinstance(layer, k.layers.BatchNormalization) and layer.weights]
            for step in range(1, config.unfreeze_steps + 1):
                count = round(config.unfreeze_layers * step / config.unfreeze_steps)
                if count == 0 or config.unfreeze_epochs == 0:
                    continue
                base.trainable = True
                for layer in base.layers:
                    layer.trainable = False
                for layer in candidates[-count:]:
                    layer.trainable = True
                with strategy.scope():
                    models.compile_model(model, info.num_classes, learning_rate=lr * config.finetune_lr_factor)
                progress(f"fine-tune: phase 2 step {step}, top {count} layers trainable, "
                         f"lr={lr * config.finetune_lr_factor:g}")
                phases.append({"phase": f"unfreeze{step}", "history": fit(model, f"unfreeze{step}",
                                                                          config.unfreeze_epochs)})
            family = config.backbone
        models.save(
            model,
            output_dir,
            models.ModelMeta(family=family, class_names=info.class_names, input_shape=list(info.shape),
                             hyperparameters=hyper, stage="finetuned"),
        )
        models.export_saved_model(model, Path(output_dir, "saved_model"))
    return FinetuneResult(phases=phases, hyperparameters=hyper)
