"""Hyperparameter search: a YAML search space, keras-tuner's oracles, and trials.

The algorithms are keras-tuner's oracles (grid, random, Bayesian optimization,
Hyperband); kftune never reimplements them. keras-tuner's Tuner classes only
accept Keras 3 models, so kftune drives the oracle itself in three verbs that
map onto pipeline steps:

* :func:`ask` asks the oracle for the next trials and records them in the
  oracle's state folder;
* :func:`run_trial` trains one trial (in its own process or pod) and returns a
  :class:`TrialResult`;
* :func:`tell` reports results back, so the next :func:`ask` sees them.

The state folder holds keras-tuner's own files (``oracle.json``,
``trial_*/trial.json``), so a search stopped at any point resumes from it:
keras-tuner sends trials that were running when it stopped back for a retry.
:func:`search` runs the three in a loop in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, models, storage
from kftune.augment import AugmentSpec, training_batches
from kftune.errors import InputError, check_numbers, check_whole_numbers

log = logging.getLogger(__name__)

ALGORITHMS = ("grid", "random", "bayesian", "hyperband")
PARAM_TYPES = ("float", "int", "choice", "bool", "fixed")
SAMPLINGS = ("linear", "log", "reverse_log")
PROJECT = "kftune_search"
RESULT_FILE = "result.json"
WEIGHTS_FILE = "checkpoint.weights.h5"
# Batch size of validation passes: it changes no number, only how much is in memory at once.
EVAL_BATCH = 256

# The tutorial's grid (learning rate x batch size), kftune's default space. One
# line: KFP writes parameter defaults into a YAML comment that breaks on newlines.
CLASSIC_SPACE_YAML = (
    "{learning_rate: {type: choice, values: [0.001, 0.003, 0.01]}, batch_size: {type: choice, values: [16, 32, 64]}}"
)

_KEYS = {
    "float": {"type", "min", "max", "step", "sampling", "default", "when"},
    "int": {"type", "min", "max", "step", "sampling", "default", "when"},
    "choice": {"type", "values", "default", "when"},
    "bool": {"type", "default", "when"},
    "fixed": {"type", "value", "when"},
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One hyperparameter of a search space."""

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    sampling: str = "linear"
    values: tuple = ()
    value: object = None
    default: object = None
    when: tuple[str, tuple] | None = None


def _param(name: str, spec) -> Param:
    where = f"search space `{name}`"
    if not isinstance(spec, dict):
        raise InputError(f"{where} must be a mapping such as {{type: float, min: 0.0001, max: 0.1}}. Received: {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise InputError(f"{where}: `type` must be one of {PARAM_TYPES}. Received: type={kind!r}")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown} for type {kind}; allowed: {sorted(_KEYS[kind])}.")
    when = spec.get("when")
    if when is not None:
        if not isinstance(when, dict) or len(when) != 1:
            raise InputError(f"{where}: `when` must name one parent, e.g. when: {{optimizer: [sgd]}}. Received: {when!r}")
        ((parent, parent_values),) = when.items()
        parent_values = parent_values if isinstance(parent_values, list) else [parent_values]
        when = (parent, tuple(parent_values))
    if kind in ("float", "int"):
        for key in ("min", "max"):
            if not isinstance(spec.get(key), int | float) or isinstance(spec.get(key), bool):
                raise InputError(f"{where}: `{key}` must be a number. Received: {key}={spec.get(key)!r}")
        lo, hi = spec["min"], spec["max"]
        if kind == "int" and (int(lo) != lo or int(hi) != hi):
            raise InputError(f"{where}: an int parameter needs whole-number min and max. Received: min={lo}, max={hi}")
        if lo >= hi:
            raise InputError(f"{where}: `min` must be less than `max`. Received: min={lo}, max={hi}")
        sampling = spec.get("sampling", "linear")
        if sampling not in SAMPLINGS:
            raise InputError(f"{where}: `sampling` must be one of {SAMPLINGS}. Received: sampling={sampling!r}")
        if sampling != "linear" and lo <= 0:
            raise InputError(f"{where}: log sampling needs min > 0. Received: min={lo}")
        step = spec.get("step")
        if step is not None and (not isinstance(step, int | float) or step <= 0):
            raise InputError(f"{where}: `step` must be a positive number. Received: step={step!r}")
        return Param(name, kind, min=lo, max=hi, step=step, sampling=sampling, default=spec.get("default"), when=when)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise InputError(f"{where}: `values` must be a non-empty list. Received: values={values!r}")
        if len({type(v) for v in values} - {int, float}) > 0 and len({type(v) for v in values}) > 1:
            raise InputError(f"{where}: `values` must all be of one type. Received: values={values!r}")
        if len(set(values)) != len(values):
            raise InputError(f"{where}: `values` has duplicates. Received: values={values!r}")
        return Param(name, kind, values=tuple(values), default=spec.get("default"), when=when)
    if kind == "fixed":
        if "value" not in spec:
            raise InputError(f"{where}: a fixed parameter needs `value`.")
        return Param(name, kind, value=spec["value"], when=when)
    return Param(name, kind, default=spec.get("default"), when=when)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A validated search space, declared in YAML as ``name: {type: ..., ...}``.

    Conditional parameters name their parent with ``when``::

        optimizer: {type: choice, values: [adam, sgd]}
        momentum: {type: float, min: 0.0, max: 0.9, when: {optimizer: [sgd]}}
    """

    params: tuple[Param, ...]

    @classmethod
    def from_yaml(cls, text: str) -> SearchSpace:
        try:
            values = yaml.safe_load(text) if text and text.strip() else None
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise InputError(
                f"search space is not valid YAML ({where}{problem}): write a mapping such as "
                "{learning_rate: {type: float, min: 0.0001, max: 0.01, sampling: log}}."
            ) from e
        if not isinstance(values, dict) or not values:
            raise InputError("search space must be a non-empty YAML mapping of name: {type: ..., ...}.")
        params = tuple(_param(str(name), spec) for name, spec in values.items())
        seen: dict[str, Param] = {}
        for p in params:
            if p.when is not None:
                parent, parent_values = p.when
                if parent not in seen:
                    raise InputError(
                        f"search space `{p.name}`: `when` names `{parent}`, which must be declared above it."
                    )
                if seen[parent].type == "choice":
                    missing = [v for v in parent_values if v not in seen[parent].values]
                    if missing:
                        raise InputError(f"search space `{p.name}`: `when` values {missing} are not choices of `{parent}`.")
            seen[p.name] = p
        return cls(params)

    def hyperparameters(self):
        """The space as keras-tuner ``HyperParameters``."""
        import keras_tuner as kt

        hp = kt.HyperParameters()
        for p in self.params:
            scope = hp.conditional_scope(p.when[0], list(p.when[1])) if p.when else contextlib.nullcontext()
            with scope:
                if p.type == "float":
                    hp.Float(p.name, p.min, p.max, step=p.step, sampling=p.sampling, default=p.default)
                elif p.type == "int":
                    hp.Int(p.name, int(p.min), int(p.max), step=int(p.step or 1), sampling=p.sampling, default=p.default)
                elif p.type == "choice":
                    hp.Choice(p.name, list(p.values), default=p.default)
                elif p.type == "bool":
                    hp.Boolean(p.name, default=bool(p.default))
                else:
                    hp.Fixed(p.name, p.value)
        return hp

    def grid_size(self) -> int:
        size = 1
        for p in self.params:
            if p.type == "choice":
                size *= len(p.values)
            elif p.type == "bool":
                size *= 2
            elif p.type in ("float", "int") and p.step:
                size *= int(math.floor((p.max - p.min) / p.step)) + 1
        return size


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How to search.

    Attributes:
        algorithm: grid, random, bayesian or hyperband (keras-tuner's oracles).
        max_trials: Upper bound on trials (grid stops earlier when exhausted;
            Hyperband's budget comes from ``epochs`` instead).
        epochs: Epochs per trial (Hyperband: the most any trial trains).
        folds: k-fold cross-validation on the training split when > 1, like
            GridSearchCV(cv=k); the objective is the mean over folds.
        seed: Seeds the oracle and training, so the same seed gives the same trials.
        model: A built-in family (``small_cnn``) or ``module:function``.
        batch_size: Batch size when the space has no ``batch_size``.
        learning_rate: Learning rate when the space has no ``learning_rate``.
        hyperband_factor: Hyperband's reduction factor.
    """

    algorithm: str = "random"
    max_trials: int = 6
    epochs: int = 3
    folds: int = 1
    seed: int = 0
    model: str = "small_cnn"
    batch_size: int = 32
    learning_rate: float = 1e-3
    hyperband_factor: int = 3

    def __post_init__(self):
        check_numbers(self, ("learning_rate",))
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"`algorithm` must be one of {ALGORITHMS}. Received: algorithm={self.algorithm!r}")
        check_whole_numbers(self, {"max_trials": 1, "epochs": 1, "folds": 1, "batch_size": 1, "hyperband_factor": 2})
        if not self.learning_rate > 0:
            raise InputError(f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate}")
        models.resolve_builder(self.model)

    def check_space(self, space: SearchSpace) -> None:
        if self.algorithm == "grid":
            for p in space.params:
                if p.type == "float" and not p.step:
                    raise InputError(
                        f"search space `{p.name}`: grid search needs a `step` for a float, or declare it as a choice."
                    )


@dataclasses.dataclass
class TrialResult:
    """The outcome of one trial, as the trials table shows it."""

    trial_id: str
    values: dict
    status: str = "COMPLETED"
    objective: float | None = None
    fold_scores: list[float] = dataclasses.field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0
    error: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialResult:
        return cls(**json.loads(text))


# ---------------------------------------------------------------- oracle


def _resumable_grid_oracle():
    """keras-tuner's grid oracle, with its place in the grid kept in its saved state.

    keras-tuner keeps the grid's order and its queue of trials to extend in
    memory only, so a grid search reloaded from its files stops after one
    trial. kftune reloads the oracle for every ask and tell (each is its own
    pod), so both go into the state here.
    """
    import keras_tuner as kt
    from keras_tuner.src.tuners.gridsearch import LinkedList

    class ResumableGridSearchOracle(kt.oracles.GridSearchOracle):
        def get_state(self):
            state = super().get_state()
            order, index = [], self._ordered_ids._next_index[None]
            while index is not None:
                order.append(self._ordered_ids._memory[index])
                index = self._ordered_ids._next_index[index]
            state["kftune_grid_order"] = order
            state["kftune_grid_populate_next"] = list(self._populate_next)
            return state

        def set_state(self, state):
            super().set_state(state)
            self._ordered_ids = LinkedList()
            for trial_id in state.get("kftune_grid_order", []):
                self._ordered_ids.insert(trial_id)
            self._populate_next = list(state.get("kftune_grid_populate_next", []))

        def end_trial(self, trial):
            super().end_trial(trial)
            self.save()  # the parent queues the trial after its own save

    return ResumableGridSearchOracle


def _oracle(space: SearchSpace, config: SearchConfig, state_dir: str | Path):
    import keras_tuner as kt

    common = dict(
        objective=kt.Objective("val_accuracy", direction="max"),
        hyperparameters=space.hyperparameters(),
        seed=config.seed + 1,  # keras-tuner treats seed 0 as "no seed"
        allow_new_entries=False,
        tune_new_entries=True,
        max_consecutive_failed_trials=max(3, config.max_trials),
    )
    if config.algorithm == "grid":
        oracle = _resumable_grid_oracle()(max_trials=config.max_trials, **common)
    elif config.algorithm == "random":
        oracle = kt.oracles.RandomSearchOracle(max_trials=config.max_trials, **common)
    elif config.algorithm == "bayesian":
        oracle = kt.oracles.BayesianOptimizationOracle(
            max_trials=config.max_trials, num_initial_points=max(2, config.max_trials // 3), **common
        )
    else:
        oracle = kt.oracles.HyperbandOracle(
            max_epochs=config.epochs, factor=config.hyperband_factor, hyperband_iterations=1, **common
        )
    oracle._set_project_dir(str(state_dir), PROJECT)
    oracle.verbose = 0
    if Path(state_dir, PROJECT, "oracle.json").exists():
        oracle.reload()
    return oracle


def ask(space: SearchSpace, config: SearchConfig, state_dir: str | Path, count: int) -> list[dict]:
    """Asks the oracle for up to ``count`` new trials; an empty list means the search is done.

    Returns one ``{"trial_id": ..., "values": {...}}`` per trial. Trials that were
    running when an earlier run stopped come back first.
    """
    import keras_tuner as kt

    config.check_space(space)
    oracle = _oracle(space, config, state_dir)
    trials = []
    for worker in range(count):
        trial = oracle.create_trial(f"worker{worker}")
        if trial.status != kt.engine.trial.TrialStatus.RUNNING:
            break  # STOPPED: the budget is spent; IDLE: Hyperband waits for this bracket.
        trials.append({"trial_id": trial.trial_id, "values": dict(trial.hyperparameters.values)})
    oracle.save()
    return trials


def tell(space: SearchSpace, config: SearchConfig, state_dir: str | Path, results: list[TrialResult]) -> None:
    """Reports finished trials to the oracle and saves its state."""
    import keras_tuner as kt

    oracle = _oracle(space, config, state_dir)
    Status = kt.engine.trial.TrialStatus
    for result in results:
        trial = oracle.trials.get(result.trial_id)
        if trial is None or trial.status in (Status.COMPLETED, Status.FAILED):
            continue  # a result told twice (a retried tell step) changes nothing
        # Ongoing trials were moved to the retry queue when the state was reloaded.
        if result.trial_id in oracle._retry_queue:
            oracle._retry_queue.remove(result.trial_id)
        if result.status == "COMPLETED":
            oracle.update_trial(result.trial_id, {"val_accuracy": result.objective}, step=result.epochs)
            trial.status = Status.COMPLETED
        else:
            trial.status = Status.FAILED
            trial.message = result.error
        oracle.ongoing_trials = {k: t for k, t in oracle.ongoing_trials.items() if t.trial_id != result.trial_id}
        oracle.end_trial(trial)
        Path(oracle._get_trial_dir(result.trial_id), RESULT_FILE).write_text(result.to_json())
    oracle.save()


def results(state_dir: str | Path) -> list[TrialResult]:
    """Every trial told so far, in trial order."""
    out = []
    for path in sorted(Path(state_dir, PROJECT).glob(f"trial_*/{RESULT_FILE}")):
        out.append(TrialResult.from_json(path.read_text()))
    return out


def best(state_dir: str | Path) -> TrialResult:
    done = [r for r in results(state_dir) if r.status == "COMPLETED" and r.objective is not None]
    if not done:
        raise InputError(
            f"no trial in `{state_dir}` completed: read the trials' errors in the search logs and fix the space or model."
        )
    return max(done, key=lambda r: (r.objective, -int(r.trial_id)))


# ---------------------------------------------------------------- trials


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


def _trial_data(dataset_dir, in_validation):
    """(train, validation) examples of one fold, streamed from the shards rather than held in memory.

    ``in_validation`` is None without folds (the dataset's own validation
    split), else a mask over the training split picking the fold's validation set.
    """
    import tensorflow as tf

    if in_validation is None:
        return dataset.load_split(dataset_dir, "train"), dataset.load_split(dataset_dir, "validation")
    mask = tf.constant(in_validation)
    numbered = dataset.load_split(dataset_dir, "train").enumerate()

    def members(validation: bool):
        return numbered.filter(lambda i, _: tf.equal(tf.gather(mask, i), validation)).map(lambda _, xy: xy)

    return members(False), members(True)


def build_for_trial(values: dict, info: dataset.DatasetInfo, config: SearchConfig):
    """Builds and compiles the model a trial's hyperparameters describe."""
    hyper = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    builder = models.resolve_builder(config.model)
    model_args = {k: v for k, v in hyper.items() if k not in ("learning_rate", "batch_size", "optimizer", "momentum")}
    model = builder(info.shape, info.num_classes, **model_args)
    return models.compile_model(
        model,
        info.num_classes,
        optimizer=hyper.get("optimizer", "adam"),
        learning_rate=hyper.get("learning_rate", config.learning_rate),
        momentum=hyper.get("momentum", 0.0),
    )


def _write_atomically(path: Path, text: str) -> None:
    """Replaces ``path`` whole: a process killed mid-write leaves the old file, never half of the new one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _epoch_callbacks(trial_dir: Path, fold: int, after_epoch: Callable[[], None] | None) -> list:
    """Per epoch, in this order: log its metrics, checkpoint it (Keras' BackupAndRestore), then ``after_epoch``.

    The log survives a killed process, so a resumed trial's objective counts
    the epochs trained before the kill too. It is written before the
    checkpoint, so that it never lacks an epoch the checkpoint holds: a kill
    between the two retrains that one epoch and overwrites its entry, rather
    than leaving an epoch trained but never counted. ``after_epoch`` (the upload
    to object storage) comes last, once both are on disk.
    """
    k = models.keras()
    path = trial_dir / f"fold{fold}.epochs.json"

    class EpochLog(k.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            entries = json.loads(path.read_text()) if path.exists() else []
            entries = [e for e in entries if e["epoch"] != epoch]
            entries.append({"epoch": epoch, **{key: float(v) for key, v in (logs or {}).items()}})
            _write_atomically(path, json.dumps(sorted(entries, key=lambda e: e["epoch"])))

    hooks = [EpochLog(), k.callbacks.BackupAndRestore(str(trial_dir / f"fold{fold}.backup"))]
    if after_epoch is not None:
        hooks.append(k.callbacks.LambdaCallback(on_epoch_end=lambda *_: after_epoch()))
    return hooks


def run_trial(
    dataset_dir: str | Path,
    trial: dict,
    config: SearchConfig,
    state_dir: str | Path,
    *,
    after_epoch: Callable[[], None] | None = None,
    verbose: int = 2,
) -> TrialResult:
    """Trains one trial and returns its result; a crash is a FAILED result, not an exception.

    Every epoch is checkpointed in the trial's folder (Keras' BackupAndRestore),
    and every finished fold is recorded, so a trial whose process was killed
    resumes from its last finished epoch when it is run again.
    ``after_epoch`` is called once each epoch's checkpoint is written (the
    pipeline uploads the trial's folder there). With Hyperband, a trial that
    continues an earlier one (``tuner/trial_id``) starts from that trial's
    saved weights at ``tuner/initial_epoch``.
    """
    import numpy as np
    import tensorflow as tf

    values = trial["values"]
    trial_dir = Path(state_dir, PROJECT, f"trial_{trial['trial_id']}")
    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = TrialResult(trial_id=trial["trial_id"], values={k_: v for k_, v in values.items() if not k_.startswith("tuner/")})
    try:
        info = dataset.DatasetInfo.load(dataset_dir)
        spec = AugmentSpec.from_dict(info.augment) if info.augment else None
        batch_size = int(values.get("batch_size", config.batch_size))
        epochs = int(values.get("tuner/epochs", config.epochs))
        parent = values.get("tuner/trial_id") if config.folds == 1 else None
        initial_epoch = int(values.get("tuner/initial_epoch", 0)) if parent else 0
        if config.folds > 1:
            labels = dataset.load_labels(dataset_dir, "train")
            folds = list(_fold_masks(labels, config.folds, config.seed, info.class_names))
        else:
            folds = [None]
        for fold, in_validation in enumerate(folds):
            done = trial_dir / f"fold{fold}.json"
            epoch_log = trial_dir / f"fold{fold}.epochs.json"
            if not done.exists():
                tf.keras.backend.clear_session()
                tf.keras.utils.set_random_seed(config.seed + fold)
                model = build_for_trial(values, info, config)
                if parent:
                    model.load_weights(Path(state_dir, PROJECT, f"trial_{parent}", WEIGHTS_FILE))
                train_data, val_data = _trial_data(dataset_dir, in_validation)
                train = training_batches(train_data, spec, batch_size, config.seed + fold)
                model.fit(
                    train,
                    validation_data=dataset.batches(val_data, EVAL_BATCH),
                    epochs=epochs,
                    initial_epoch=initial_epoch,
                    callbacks=_epoch_callbacks(trial_dir, fold, after_epoch),
                    verbose=verbose,
                )
                if config.folds == 1:
                    model.save_weights(trial_dir / WEIGHTS_FILE)
                logged = json.loads(epoch_log.read_text())
                _write_atomically(done, json.dumps({
                    "score": max(e["val_accuracy"] for e in logged),
                    "epochs": len(logged),
                }))
            fold_result = json.loads(done.read_text())
            result.fold_scores.append(float(fold_result["score"]))
            result.epochs += int(fold_result["epochs"])
        result.objective = float(np.mean(result.fold_scores))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a crashed trial is recorded and the search goes on
        result.status = "FAILED"
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("trial %s failed: %s\n%s", trial["trial_id"], result.error, traceback.format_exc())
    result.seconds = round(time.time() - started, 2)
    return result


def search(
    dataset_dir: str | Path,
    space: SearchSpace,
    config: SearchConfig,
    state_dir: str | Path,
    *,
    progress: Callable[[str], None] = print,
    verbose: int = 0,
) -> TrialResult:
    """Runs a whole search in this process, one trial at a time, and returns the best trial."""
    config.check_space(space)
    while True:
        trials = ask(space, config, state_dir, 1)
        if not trials:
            break
        result = run_trial(dataset_dir, trials[0], config, state_dir, verbose=verbose)
        tell(space, config, state_dir, [result])
        progress(
            f"search: trial {result.trial_id} {result.status} objective={result.objective} "
            f"epochs={result.epochs} {json.dumps(result.values)}"
        )
    return best(state_dir)


def save_best_model(
    dataset_dir: str | Path, state_dir: str | Path, config: SearchConfig, output_dir: str | Path, *, verbose: int = 0
) -> TrialResult:
    """Saves the best trial's model to ``output_dir``.

    Trials keep their weights when trained without folds; with k-fold
    cross-validation, the best hyperparameters are trained once more on the
    whole training split, as GridSearchCV's ``refit`` does.
    """
    import tensorflow as tf

    winner = best(state_dir)
    info = dataset.DatasetInfo.load(dataset_dir)
    weights = Path(state_dir, PROJECT, f"trial_{winner.trial_id}", WEIGHTS_FILE)
    if config.folds == 1 and weights.exists():
        model = build_for_trial(winner.values, info, config)
        model.load_weights(weights)
    else:
        tf.keras.utils.set_random_seed(config.seed)
        model = build_for_trial(winner.values, info, config)
        spec = AugmentSpec.from_dict(info.augment) if info.augment else None
        batch_size = int(winner.values.get("batch_size", config.batch_size))
        model.fit(training_batches(dataset.load_split(dataset_dir, "train"), spec, batch_size, config.seed),
                  epochs=config.epochs, verbose=verbose)
    hyper = {"batch_size": config.batch_size, "learning_rate": config.learning_rate, **winner.values}
    models.save(
        model,
        output_dir,
        models.ModelMeta(family=config.model, class_names=info.class_names, input_shape=list(info.shape),
                         hyperparameters=hyper, stage="baseline"),
    )
    return winner


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """Everything the search steps share: the space, the config and where the state lives.

    Validated once by the first search step and handed to the others as JSON.
    """

    space_yaml: str
    config: SearchConfig
    state_uri: str

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_yaml(self.space_yaml)

    def to_json(self) -> str:
        return json.dumps({"space_yaml": self.space_yaml, "config": dataclasses.asdict(self.config), "state_uri": self.state_uri})

    @classmethod
    def from_json(cls, text: str) -> SearchPlan:
        values = json.loads(text)
        return cls(values["space_yaml"], SearchConfig(**values["config"]), values["state_uri"])

    @classmethod
    def read(cls, path: str | Path) -> SearchPlan:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def create(cls, space_yaml: str, config: SearchConfig, state_uri: str) -> SearchPlan:
        space = SearchSpace.from_yaml(space_yaml)
        config.check_space(space)
        if not state_uri:
            raise InputError("`state_uri` is empty: give a folder or gs:// prefix that outlives the run.")
        # Every later step reads and writes there: a missing bucket must stop the run now, not after a round.
        storage.check_reachable(state_uri)
        return cls(space_yaml, config, state_uri)
