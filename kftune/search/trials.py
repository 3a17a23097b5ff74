"""Trials: one trial's training (its folds, its checkpoints, its early stop), and what it reports.

A trial's folder, ``<search_state_uri>/trials/trial_<id>/``, holds its
resumable fits (:mod:`kftune.training`): each epoch's log and checkpoint, and
the final weights a trial without folds hands on. A trial touches only its own
folder (and reads a Hyperband parent's weights file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, models, storage, training
from kftune.augment import AugmentSpec, training_batches
from kftune.errors import InputError
from kftune.search.config import SearchConfig

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"
# The weights a trial without folds hands on (training.fit's file of its one fit, "fold0").
WEIGHTS_FILE = "fold0.weights.h5"
# The fit that trains a k-fold winner once more on the whole training split.
REFIT = "refit"
COMPLETED, STOPPED, FAILED = "COMPLETED", "STOPPED", "FAILED"


def trial_uri(state_uri: str | Path, trial_id: str) -> str:
    return f"{str(state_uri).rstrip('/')}/{TRIALS_DIR}/trial_{trial_id}"


def own_values(values: dict) -> dict:
    """A trial's hyperparameters, without keras-tuner's ``tuner/*`` bookkeeping (Hyperband's epochs, parent)."""
    return {k: v for k, v in values.items() if not k.startswith("tuner/")}


@dataclasses.dataclass
class TrialResult:
    """The outcome of one trial, as the trials table shows it."""

    trial_id: str
    values: dict
    status: str = COMPLETED
    objective: float | None = None
    fold_scores: list[float] = dataclasses.field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0
    error: str = ""
    # The learning curve, [epoch, val_accuracy] per epoch (the first fold's with folds): the Run UI draws it.
    curve: list = dataclasses.field(default_factory=list)
    # The epoch after which early stopping (asha, early_stopping=median) stopped it; 0 if it ran all its epochs.
    stopped_at: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialResult:
        return cls(**json.loads(text))

    def describe(self) -> str:
        if self.status == STOPPED:
            return f"stopped after epoch {self.stopped_at}: val_accuracy {self.objective:.4f}, {self.seconds:.0f} s"
        if self.status != COMPLETED:
            return f"{self.status}: {self.error}"
        folds = f" (folds {' '.join(f'{s:.4f}' for s in self.fold_scores)})" if len(self.fold_scores) > 1 else ""
        return f"val_accuracy {self.objective:.4f}{folds}, {self.epochs} epochs, {self.seconds:.0f} s"


def _fold_masks(labels, k: int, seed: int, class_names: list[str]):
    """Stratified k-fold splits of the training split, like scikit-learn's StratifiedKFold.

    Yields, per fold, which training examples are its validation set. Only the
    labels are needed to choose them, so no image is loaded here.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels, minlength=len(class_names))
    if counts.min() < k:
        smallest = int(counts.argmin())
        raise InputError(
            f"`folds`={k} needs at least {k} training images of every class, but class "
            f"`{class_names[smallest]}` has {counts[smallest]}: lower `folds` or add images."
        )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for _, val_idx in splitter.split(np.zeros((len(labels), 1)), labels):
        mask = np.zeros(len(labels), dtype=bool)
        mask[val_idx] = True
        yield mask


def _trial_data(dataset_dir, info: dataset.DatasetInfo, in_validation):
    """(train, validation) examples of one fold, as every epoch reads them (:func:`kftune.dataset.for_epochs`).

    ``in_validation`` is None without folds (the dataset's own validation
    split), else a mask over the training split picking the fold's validation set.
    """
    import tensorflow as tf

    if in_validation is None:
        return dataset.epoch_split(dataset_dir, "train"), dataset.epoch_split(dataset_dir, "validation")
    mask = tf.constant(in_validation)
    numbered = dataset.load_split(dataset_dir, "train").enumerate()

    def members(validation: bool):
        chosen = numbered.filter(lambda i, _: tf.equal(tf.gather(mask, i), validation)).map(lambda _, xy: xy)
        return dataset.for_epochs(chosen, info, int((in_validation == validation).sum()))

    return members(False), members(True)


def model_arguments(values: dict, config: SearchConfig) -> dict:
    """The hyperparameters a trial passes to the model function (not the optimizer's or the batch size)."""
    hyper = own_values(values)
    model_args = {k: v for k, v in hyper.items() if k not in ("learning_rate", "batch_size", "optimizer", "momentum")}
    # An int hyperparameter reaches the user's function as an int, whatever JSON made of it on the way.
    ints = {p.name for p in config.space.params if p.type == "int"}
    return {k: int(v) if k in ints else v for k, v in model_args.items()}


def build_for_trial(values: dict, info: dataset.DatasetInfo, config: SearchConfig, *, compile: bool = True):
    """Builds (and compiles) the model a trial's hyperparameters describe."""
    hyper = own_values(values)
    model = models.build(config.model, info.shape, info.num_classes, **model_arguments(values, config))
    if not compile:
        return model
    return models.compile_model(
        model,
        info.num_classes,
        optimizer=hyper.get("optimizer", "adam"),
        learning_rate=hyper.get("learning_rate", config.learning_rate),
        momentum=hyper.get("momentum", 0.0),
    )


def _build_first(trial: dict, info: dataset.DatasetInfo, config: SearchConfig):
    """Builds a trial's model; a function that fails the same way for the search's first trial and for another
    point of the space is no model builder (a typo'd name, the wrong function): one line, and the search stops.

    When the space gives the model function no arguments, every trial builds the same model, so a first
    failure is every trial's. A function that fails for some values only is a failed trial and the search goes on.
    """
    try:
        return build_for_trial(trial["values"], info, config)
    except models.BuilderError as e:
        if not trial.get("first"):
            raise
        tried = model_arguments(trial["values"], config)
        others = [point for point in (config.space.corner(), config.space.corner(last=True))
                  if model_arguments(point, config) != tried]
        if others:
            try:
                build_for_trial(others[0], info, config, compile=False)
                same = False  # it builds for other values: this trial's failure is its own
            except models.BuilderError as again:
                same = type(again.__cause__) is type(e.__cause__)
            if not same:
                raise
        said = str(e).split(" raised ", 1)[-1]
        again = "and again for another point of the search space" if others else "and every trial builds the same model"
        raise InputError(
            f"`model` `{config.model}` is no model builder kftune can call: it raised {said} for the first trial "
            f"{again}. It must be fn(input_shape, num_classes, **hyperparameters) returning an uncompiled tf-keras "
            "model: fix it and run again.") from e


def run_trial(
    dataset_dir: str | Path,
    trial: dict,
    config: SearchConfig,
    trial_dir: str | Path,
    *,
    parent_weights: str | Path | None = None,
    after_epoch: Callable[[], None] | None = None,
    report: Callable[[int, float], bool] | None = None,
    verbose: int = 2,
) -> TrialResult:
    """Trains one trial in ``trial_dir`` and returns its result; a crash is a FAILED result, not an exception.

    ``report(epoch, val_accuracy)`` is called after each epoch but the last of
    the first fold; when it answers True (early stopping) the trial stops there:
    a STOPPED result scored by the epoch it stopped at, whose weights it keeps.

    A trial's score is its final epoch's val_accuracy (with folds: each fold's
    final epoch, averaged), the score of the weights it keeps and hands on; not
    the best epoch's, whose weights no one keeps. Each fold is one
    :func:`kftune.training.fit` in the trial's folder (per-epoch checkpoint,
    done-marker), so a trial whose process was killed resumes from its last
    finished epoch when it is run again.
    ``after_epoch`` is called once each epoch's checkpoint is written (the
    pipeline uploads the trial's folder there). With Hyperband, a trial that
    continues an earlier one (``tuner/trial_id``) starts from that trial's
    saved weights (``parent_weights``) at ``tuner/initial_epoch``.
    """
    import numpy as np
    import tensorflow as tf

    values = trial["values"]
    trial_dir = Path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = TrialResult(trial_id=trial["trial_id"], values=own_values(values))
    try:
        info = dataset.DatasetInfo.load(dataset_dir)
        spec = AugmentSpec.from_dict(info.augment) if info.augment else None
        batch_size = int(values.get("batch_size", config.batch_size))
        epochs = int(values.get("tuner/epochs", config.trial_epochs))
        parent = values.get("tuner/trial_id") if config.folds == 1 else None
        initial_epoch = int(values.get("tuner/initial_epoch", 0)) if parent else 0
        if config.folds > 1:
            labels = dataset.load_labels(dataset_dir, "train")
            folds = list(_fold_masks(labels, config.folds, config.seed, info.class_names))
        else:
            folds = [None]
        for fold, in_validation in enumerate(folds):
            name = f"fold{fold}"
            history = training.finished(trial_dir, name)  # a fold finished before a kill is not built again
            if history is None:
                tf.keras.backend.clear_session()
                tf.keras.utils.set_random_seed(config.seed + fold)
                model = _build_first(trial, info, config)
                if parent:
                    model.load_weights(parent_weights)
                train_data, val_data = _trial_data(dataset_dir, info, in_validation)
                stopper = [_stopper(report, epochs)] if report is not None and fold == 0 else []
                history = training.fit(
                    model, name, training_batches(train_data, spec, batch_size, config.seed + fold), trial_dir,
                    epochs=epochs, validation=dataset.batches(val_data), initial_epoch=initial_epoch,
                    callbacks=stopper,
                    # Only a trial without folds hands its weights on (to save_best_model, a Hyperband child).
                    keep_weights=config.folds == 1, after_epoch=after_epoch, verbose=verbose,
                )
            # The final epoch's score: the weights kept (and a fold's model) are the final epoch's.
            scores = history["val_accuracy"]
            result.fold_scores.append(float(scores[-1]))
            result.epochs += len(scores)
            if fold == 0:
                result.curve = [[initial_epoch + i + 1, float(s)] for i, s in enumerate(scores)]
                if initial_epoch + len(scores) < epochs:  # stopped early (also when a rerun finds the fit done)
                    result.status, result.stopped_at = STOPPED, initial_epoch + len(scores)
                    break
        result.objective = float(np.mean(result.fold_scores))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a crashed trial is recorded and the search goes on
        result.status = FAILED
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("trial %s failed: %s\n%s", trial["trial_id"], result.error, traceback.format_exc())
    result.seconds = round(time.time() - started, 2)
    return result


def _stopper(report: Callable[[int, float], bool], epochs: int):
    """A Keras callback asking ``report`` after each epoch but the last whether the trial stops there."""
    k = models.keras()

    class Stopper(k.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 < epochs and report(epoch + 1, float((logs or {})["val_accuracy"])):
                self.model.stop_training = True

    return Stopper()


def run_stored_trial(dataset_dir: str | Path, trial: dict, config: SearchConfig, *, verbose: int = 2) -> TrialResult:
    """Runs one trial against the search state at ``config.search_state_uri``, touching only its own files.

    The trial's folder is synced to storage after every epoch, so a trial
    whose process or pod was killed resumes from its last finished epoch.
    """
    import tempfile

    own = storage.mirror(trial_uri(config.search_state_uri, trial["trial_id"]))
    with own as trial_dir, tempfile.TemporaryDirectory() as work:
        parent = trial["values"].get("tuner/trial_id") if config.folds == 1 else None
        parent_weights = None
        if parent:
            parent_weights = storage.fetch(f"{trial_uri(config.search_state_uri, parent)}/{WEIGHTS_FILE}", work)
        report = None
        if config.stops_early:
            from kftune.search import oracles

            def report(epoch: int, score: float) -> bool:
                with oracles.oracle_turn(config.search_state_uri) as state_dir:
                    return oracles.report_epoch(config, state_dir, trial["trial_id"], epoch, score)

        return run_trial(dataset_dir, trial, config, trial_dir, parent_weights=parent_weights,
                         after_epoch=own.sync, report=report, verbose=verbose)
