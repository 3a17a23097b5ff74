"""Hyperparameter search: a YAML search space, keras-tuner's oracles, and trials.

The algorithms are keras-tuner's oracles (grid, random, Bayesian optimization,
Hyperband); kftune never reimplements them. keras-tuner's Tuner classes only
accept Keras 3 models, so kftune drives the oracle itself:

* :func:`work` is one search worker: it asks the oracle for a trial, trains it
  (in a fresh process), tells the result, and goes on until the search is done.
  Any number of workers, each its own pod, share one oracle at
  ``search_state_uri``, taking turns through a lock (:func:`oracle_turn`);
* :func:`ask`, :func:`run_trial` and :func:`tell` are the three verbs a worker uses;
* :func:`search` runs a whole search in one process; :func:`save_best_model`
  writes the winner.

The oracle's state is keras-tuner's own files, stored as one document that each
oracle turn replaces whole (:mod:`kftune.search_state`), so a search stopped at
any point, even mid-write, resumes from it; a worker started again gets its own unfinished trial back and
resumes it from its last epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, models, search_state, storage, training
from kftune.augment import AugmentSpec, training_batches
from kftune.errors import InputError, StorageError, check_numbers, check_whole_numbers

log = logging.getLogger(__name__)

ALGORITHMS = ("grid", "random", "bayesian", "hyperband")
PARAM_TYPES = ("float", "int", "choice", "bool", "fixed")
SAMPLINGS = ("linear", "log", "reverse_log")
PROJECT = "kftune_search"
RESULT_FILE = "result.json"
# The weights a trial without folds hands on (training.fit's file of its one fit, "fold0").
WEIGHTS_FILE = "fold0.weights.h5"
# The fit that trains a k-fold winner once more on the whole training split.
REFIT = "refit"
# Upper bounds that catch a typo (max_trials=100000) before it books GPUs for days.
MAX_TRIALS, MAX_PARALLEL = 10_000, 64

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

    def corner(self, last: bool = False) -> dict:
        """A point of the space: each active parameter's default (else its first value or ``min``, False for a
        bool), or with ``last`` its last value or ``max`` (True for a bool)."""
        out: dict = {}
        for p in self.params:
            if p.when and out.get(p.when[0]) not in p.when[1]:
                continue
            if p.type == "fixed":
                out[p.name] = p.value
            elif p.default is not None and not last:
                out[p.name] = p.default
            elif p.type == "choice":
                out[p.name] = p.values[-1 if last else 0]
            elif p.type == "bool":
                out[p.name] = last
            else:
                bound = p.max if last else p.min
                out[p.name] = int(bound) if p.type == "int" else bound
        return out

    def grid_size(self) -> int:
        size = 1
        for p in self.params:
            if p.type == "choice":
                size *= len(p.values)
            elif p.type == "bool":
                size *= 2
            elif p.type == "int" or (p.type == "float" and p.step):
                size *= int(math.floor((p.max - p.min) / (p.step or 1))) + 1
        return size


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How to search.

    Attributes:
        search_space: YAML search space, name: {type: float/int/choice/bool/fixed, min,
            max, step, sampling: log, values, when: {parent: [values]}}, e.g.
            {learning_rate: {type: float, min: 0.0001, max: 0.01, sampling: log}}.
        search_algorithm: grid, random, bayesian or hyperband (keras-tuner's oracles).
        max_trials: Trials to run (grid: at most the grid's size; Hyperband
            budgets by ``trial_epochs`` instead).
        parallel_trials: Trials that train at once, each in its own worker task
            (a pod with a GPU on a cluster); at most max_trials.
        trial_epochs: Epochs per trial (Hyperband: the most any trial trains).
            A trial's objective is its final epoch's val_accuracy, the score
            of the weights it hands on.
        folds: k-fold cross-validation on the training split when > 1, like
            GridSearchCV(cv=k); the objective is the mean over folds of each
            fold's final epoch, and the winner is refit on the whole split.
        seed: Seeds the oracle and training, so the same seed gives the same trials.
        model: A built-in family (``small_cnn``) or ``module:function``.
        batch_size: Batch size when the space has no ``batch_size``.
        learning_rate: Learning rate when the space has no ``learning_rate``.
        hyperband_factor: Hyperband's reduction factor.
        search_state_uri: Where the oracle's state and the trials' checkpoints
            live: a folder or gs:// prefix. Empty: under the pipeline root, per run.
            Reuse a URI to resume a stopped search.
    """

    search_space: str = CLASSIC_SPACE_YAML
    search_algorithm: str = "random"
    max_trials: int = 6
    parallel_trials: int = 2
    trial_epochs: int = 3
    folds: int = 1
    seed: int = 0
    model: str = "small_cnn"
    batch_size: int = 32
    learning_rate: float = 1e-3
    hyperband_factor: int = 3
    search_state_uri: str = ""

    def __post_init__(self):
        check_numbers(self, ("learning_rate",))
        if self.search_algorithm not in ALGORITHMS:
            raise InputError(f"`search_algorithm` must be one of {ALGORITHMS}. Received: search_algorithm={self.search_algorithm!r}")
        check_whole_numbers(self, {"max_trials": 1, "parallel_trials": 1, "trial_epochs": 1, "folds": 1,
                                   "batch_size": 1, "hyperband_factor": 2, "seed": 0})
        for name, most in (("max_trials", MAX_TRIALS), ("parallel_trials", MAX_PARALLEL), ("trial_epochs", 10_000),
                           ("folds", 1000)):
            if getattr(self, name) > most:
                raise InputError(f"`{name}` must be at most {most}. Received: {name}={getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InputError(f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate}")
        if self.search_state_uri:
            storage.check_location(self.search_state_uri, "search_state_uri")
        self.check_space(self.space)
        models.resolve_builder(self.model)

    @property
    def space(self) -> SearchSpace:
        return SearchSpace.from_yaml(self.search_space)

    def check_workers(self) -> None:
        """Says before any training why the requested trials cannot all run."""
        if self.search_algorithm == "hyperband":
            return  # its brackets set the number of trials; parallel_trials bounds how many train at once
        if self.parallel_trials > self.max_trials:
            raise InputError(
                f"`parallel_trials`={self.parallel_trials} is more than `max_trials`={self.max_trials}: the extra "
                "workers would hold a GPU with nothing to train. Lower parallel_trials or raise max_trials.")
        if self.search_algorithm == "grid" and self.max_trials > (size := self.space.grid_size()):
            raise InputError(
                f"`max_trials`={self.max_trials} is more than the {size} points of the grid in `search_space`: "
                f"set max_trials={size} to run the whole grid, or add values to the space.")
        if note := self.partial_grid():
            log.warning("%s", note)

    def partial_grid(self) -> str:
        """A line saying that a grid search will run only part of its grid; empty when it runs all of it."""
        if self.search_algorithm != "grid" or self.max_trials >= (size := self.space.grid_size()):
            return ""
        return (f"search: max_trials={self.max_trials} runs {self.max_trials} of the {size} points of the grid "
                f"(the first in keras-tuner's order); set max_trials={size} to run them all.")

    def check_space(self, space: SearchSpace) -> None:
        if self.search_algorithm == "grid":
            for p in space.params:
                if p.type == "float" and not p.step:
                    raise InputError(
                        f"search space `{p.name}`: grid search needs a `step` for a float, or declare it as a choice."
                    )


def own_values(values: dict) -> dict:
    """A trial's hyperparameters, without keras-tuner's ``tuner/*`` bookkeeping (Hyperband's epochs, parent)."""
    return {k: v for k, v in values.items() if not k.startswith("tuner/")}


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

    def describe(self) -> str:
        if self.status != "COMPLETED":
            return f"{self.status}: {self.error}"
        folds = f" (folds {' '.join(f'{s:.4f}' for s in self.fold_scores)})" if len(self.fold_scores) > 1 else ""
        return f"val_accuracy {self.objective:.4f}{folds}, {self.epochs} epochs, {self.seconds:.0f} s"


# ---------------------------------------------------------------- oracle
#
# A search's state (``search_state_uri``) is laid out so that each step moves
# only what it needs:
#
#   oracle-state.json.gz   keras-tuner's oracle.json and trial_*/trial.json, plus each
#                          told trial's result.json, as one document replaced whole by
#                          each oracle turn (kftune.search_state): kilobytes per trial
#   oracle.lock            held by the worker taking its turn at the oracle
#   trials/trial_<id>/     one trial's epoch log, backups and final weights
#
# An oracle turn reads and writes the oracle's document only; a trial reads and
# writes its own folder (and reads a Hyperband parent's weights file); the result
# step reads the document and the winner's weights file.

TRIALS_DIR, LOCK_FILE = "trials", "oracle.lock"
# How long a worker waits, in all, for a Hyperband bracket or grid step other workers are finishing.
IDLE_TIMEOUT_S = 6 * 3600.0


def trial_uri(state_uri: str | Path, trial_id: str) -> str:
    return f"{str(state_uri).rstrip('/')}/{TRIALS_DIR}/trial_{trial_id}"


def _oracle(config: SearchConfig, oracle_dir: str | Path):
    import keras_tuner as kt

    from kftune import tuner_compat

    common = dict(
        objective=kt.Objective("val_accuracy", direction="max"),
        hyperparameters=config.space.hyperparameters(),
        seed=config.seed + 1,  # keras-tuner treats seed 0 as "no seed"
        allow_new_entries=False,
        tune_new_entries=True,
        max_consecutive_failed_trials=max(3, config.max_trials),
    )
    if config.search_algorithm == "grid":
        oracle = tuner_compat.resumable_grid_oracle()(max_trials=config.max_trials, **common)
    elif config.search_algorithm == "random":
        oracle = kt.oracles.RandomSearchOracle(max_trials=config.max_trials, **common)
    elif config.search_algorithm == "bayesian":
        oracle = tuner_compat.distinct_bayesian_oracle()(
            max_trials=config.max_trials, num_initial_points=max(2, config.max_trials // 3), **common
        )
    else:
        oracle = kt.oracles.HyperbandOracle(
            max_epochs=config.trial_epochs, factor=config.hyperband_factor, hyperband_iterations=1, **common
        )
    tuner_compat.open_project(oracle, oracle_dir, PROJECT)
    return oracle


RUNNING, IDLE, STOPPED = "RUNNING", "IDLE", "STOPPED"


def ask(config: SearchConfig, oracle_dir: str | Path, worker: str = "worker0") -> tuple[str, dict | None]:
    """Asks the oracle for ``worker``'s next trial.

    Returns ``(RUNNING, {"trial_id": ..., "values": {...}})``; ``(IDLE, None)``
    while the oracle waits for other workers' trials (a Hyperband bracket, the
    grid's next step); ``(STOPPED, None)`` once the search is done. A worker
    that was stopped part-way gets its own unfinished trial back first.
    """
    import keras_tuner as kt

    oracle = _oracle(config, oracle_dir)
    trial = oracle.create_trial(worker)
    oracle.save()
    if trial.status == kt.engine.trial.TrialStatus.RUNNING:
        # "first": no trial has completed yet, so a model function that fails here may be no builder at all.
        first = not any(r.status == "COMPLETED" for r in results(oracle_dir))
        return RUNNING, {"trial_id": trial.trial_id, "values": dict(trial.hyperparameters.values), "first": first}
    return (STOPPED, None) if trial.status == kt.engine.trial.TrialStatus.STOPPED else (IDLE, None)


def tell(config: SearchConfig, oracle_dir: str | Path, results: list[TrialResult]) -> None:
    """Reports finished trials to the oracle and saves its state."""
    import keras_tuner as kt

    from kftune import tuner_compat

    oracle = _oracle(config, oracle_dir)
    Status = kt.engine.trial.TrialStatus
    for result in results:
        trial = oracle.trials.get(result.trial_id)
        if trial is None or trial.status in (Status.COMPLETED, Status.FAILED):
            continue  # a result told twice (a retried worker) changes nothing
        tuner_compat.forget_retry(oracle, result.trial_id)
        if result.status == "COMPLETED":
            oracle.update_trial(result.trial_id, {"val_accuracy": result.objective}, step=result.epochs)
            trial.status = Status.COMPLETED
        else:
            trial.status = Status.FAILED
            trial.message = result.error
        oracle.ongoing_trials = {k: t for k, t in oracle.ongoing_trials.items() if t.trial_id != result.trial_id}
        oracle.end_trial(trial)
        Path(tuner_compat.trial_dir(oracle, result.trial_id), RESULT_FILE).write_text(result.to_json())
    oracle.save()


def results(oracle_dir: str | Path) -> list[TrialResult]:
    """Every trial told so far, in trial order."""
    out = []
    for path in sorted(Path(oracle_dir, PROJECT).glob(f"trial_*/{RESULT_FILE}")):
        out.append(TrialResult.from_json(path.read_text()))
    return out


def best(oracle_dir: str | Path) -> TrialResult:
    done = [r for r in results(oracle_dir) if r.status == "COMPLETED" and r.objective is not None]
    if not done:
        failed = [r for r in results(oracle_dir) if r.error]
        why = f" The first error: trial {failed[0].trial_id}: {failed[0].error}." if failed else ""
        raise InputError(
            f"no trial completed.{why} Read the trials' errors in the search logs and fix the space or model."
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
    verbose: int = 2,
) -> TrialResult:
    """Trains one trial in ``trial_dir`` and returns its result; a crash is a FAILED result, not an exception.

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
                history = training.fit(
                    model, name, training_batches(train_data, spec, batch_size, config.seed + fold), trial_dir,
                    epochs=epochs, validation=dataset.batches(val_data), initial_epoch=initial_epoch,
                    # Only a trial without folds hands its weights on (to save_best_model, a Hyperband child).
                    keep_weights=config.folds == 1, after_epoch=after_epoch, verbose=verbose,
                )
            # The final epoch's score: the weights kept (and a fold's model) are the final epoch's.
            result.fold_scores.append(float(history["val_accuracy"][-1]))
            result.epochs += len(history["val_accuracy"])
        result.objective = float(np.mean(result.fold_scores))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a crashed trial is recorded and the search goes on
        result.status = "FAILED"
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("trial %s failed: %s\n%s", trial["trial_id"], result.error, traceback.format_exc())
    result.seconds = round(time.time() - started, 2)
    return result


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
        return run_trial(dataset_dir, trial, config, trial_dir, parent_weights=parent_weights,
                         after_epoch=own.sync, verbose=verbose)


@contextlib.contextmanager
def oracle_turn(state_uri: str | Path):
    """The oracle's files, held by this process alone until the block ends (and stored again if it ends well)."""
    from kftune import locking

    root = str(state_uri).rstrip("/")
    with locking.lock(f"{root}/{LOCK_FILE}"), search_state.opened(root, write=True) as oracle_dir:
        yield oracle_dir


def told(state_uri: str | Path) -> list[TrialResult]:
    """Every trial told so far to the search at ``state_uri``, in trial order (read without the lock)."""
    with search_state.opened(state_uri, write=False) as oracle_dir:
        return results(oracle_dir)


# A worker's trials run in one child process, not in the worker's own: a trial that crashes the
# process (out of memory, a native fault) ends only that process. It is replaced after a trial that
# failed (which may leave the GPU's memory fragmented) and after this many trials (TensorFlow keeps
# a little of every model a process built). Starting a process costs seconds (TensorFlow's import,
# its first trace; CUDA's start on a GPU): a process per trial was 54 s of a 94 s, 9-trial search.
TRIALS_PER_PROCESS = 16


class TrialProcess:
    """Runs a worker's trials, one at a time, in a child process it replaces when needed.

    The child is ``python -m kftune.search FD``: it reads one trial a line on stdin and
    writes each result as a line to descriptor FD, so that its stdout and stderr (Keras'
    epoch lines) stay the worker's log. A child that ends mid-trial leaves the pipe closed.
    """

    def __init__(self):
        self._child, self._results, self._ran = None, None, 0

    def run(self, dataset_dir: str | Path, trial: dict, config: SearchConfig) -> TrialResult:
        import os
        import subprocess
        import sys

        if self._child is None:
            read, write = os.pipe()
            self._child = subprocess.Popen([sys.executable, "-m", "kftune.search", str(write)], stdin=subprocess.PIPE,
                                           pass_fds=(write,), text=True)
            os.close(write)
            self._results, self._ran = os.fdopen(read), 0
        # sys.path too: the child imports the user's model module wherever the worker finds it.
        request = {"dataset_dir": str(dataset_dir), "trial": trial, "config": dataclasses.asdict(config),
                   "sys_path": sys.path}
        try:
            self._child.stdin.write(json.dumps(request) + "\n")
            self._child.stdin.flush()
            line = self._results.readline()
        except BrokenPipeError:
            line = ""
        self._ran += 1
        if not line:
            code = self.close()
            return TrialResult(trial["trial_id"], own_values(trial["values"]), status="FAILED",
                               error=f"the trial's process ended with exit code {code} before the trial did "
                                     "(killed, or out of memory?)")
        answer = json.loads(line)
        if "input_error" in answer:
            self.close()
            raise InputError(answer["input_error"])
        result = TrialResult.from_json(answer["result"])
        if result.status == "FAILED" or self._ran >= TRIALS_PER_PROCESS:
            self.close()
        return result

    def close(self) -> int | None:
        """Ends the child (it exits when its stdin closes); returns its exit code."""
        if self._child is None:
            return None
        try:
            self._child.stdin.close()
        except BrokenPipeError:
            pass
        code = self._child.wait()
        self._results.close()
        self._child = self._results = None
        return code


def _serve(results_fd: int) -> int:
    """The child of :class:`TrialProcess`: one trial a line on stdin, one result a line to ``results_fd``."""
    import os
    import sys
    import threading

    worker = os.getppid()

    def end_with_the_worker():
        # A worker killed mid-trial (SIGKILL, no chance to close the pipe) must not leave its trial training
        # on: the worker started again resumes that trial, and two processes would write its folder.
        while os.getppid() == worker:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=end_with_the_worker, daemon=True).start()
    with os.fdopen(results_fd, "w") as results_out:
        for line in sys.stdin:
            request = json.loads(line)
            sys.path[:0] = [entry for entry in request["sys_path"] if entry not in sys.path]
            try:
                result = run_stored_trial(request["dataset_dir"], request["trial"], SearchConfig(**request["config"]))
                answer = {"result": result.to_json()}
            except InputError as e:
                answer = {"input_error": str(e)}
            results_out.write(json.dumps(answer) + "\n")
            results_out.flush()
    return 0


def work(
    dataset_dir: str | Path,
    config: SearchConfig,
    worker: int = 0,
    *,
    in_child: bool = True,
    progress: Callable[[str], None] = print,
    poll: float = 1.0,
) -> list[TrialResult]:
    """One search worker: asks for a trial, trains it, tells the result, until the search is done.

    Any number of workers may run at once against one ``config.search_state_uri``
    (they take turns at the oracle through a lock), each in its own pod; the
    search ends when every worker has stopped. A worker that is restarted
    (a preempted pod, a retried task) resumes its unfinished trial from its last
    epoch. Trials run in a child process (:class:`TrialProcess`) unless ``in_child``
    is False. Returns the trials this worker ran.
    """
    if not config.search_state_uri:
        raise InputError("`search_state_uri` is empty: give a folder or gs:// prefix that outlives the run.")
    name, ran, idle_since, wait = f"worker{worker}", [], None, poll
    if worker == 0 and (note := config.partial_grid()):
        progress(note)
    processes = TrialProcess() if in_child else None
    try:
        while True:
            with oracle_turn(config.search_state_uri) as oracle_dir:
                status, trial = ask(config, oracle_dir, name)
            if status == STOPPED:
                return ran
            if status == IDLE:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_TIMEOUT_S:
                    raise StorageError(f"search worker {worker} waited {IDLE_TIMEOUT_S:.0f} s for other workers' "
                                       f"trials at `{config.search_state_uri}`: a worker stopped without finishing. "
                                       "Rerun the pipeline with the same search_state_uri to resume.")
                # Each ask is an oracle turn (the lock, a listing, the oracle's files): ask less often the longer
                # the other workers' trials take.
                time.sleep(wait)
                wait = min(wait * 1.5, 30.0)
                continue
            idle_since, wait = None, poll
            progress(f"search: worker {worker} trains trial {trial['trial_id']} "
                     f"{json.dumps(own_values(trial['values']))}")
            if processes is not None:
                result = processes.run(dataset_dir, trial, config)
            else:
                result = run_stored_trial(dataset_dir, trial, config, verbose=0)
            with oracle_turn(config.search_state_uri) as oracle_dir:
                tell(config, oracle_dir, [result])
                told = len(results(oracle_dir))
            ran.append(result)
            # Hyperband's brackets, not max_trials, set how many trials it runs.
            budget = "" if config.search_algorithm == "hyperband" else f" of {config.max_trials}"
            progress(f"search: trial {result.trial_id} {result.describe()} ({told}{budget} told)")
    finally:
        if processes is not None:
            processes.close()


def search(
    dataset_dir: str | Path,
    config: SearchConfig,
    *,
    progress: Callable[[str], None] = print,
) -> TrialResult:
    """Runs a whole search in this process, one trial at a time, and returns the best trial."""
    work(dataset_dir, config, in_child=False, progress=progress)
    with search_state.opened(config.search_state_uri, write=False) as oracle_dir:
        return best(oracle_dir)


def save_best_model(dataset_dir: str | Path, config: SearchConfig, output_dir: str | Path, *,
                    verbose: int = 0) -> tuple[TrialResult, list[TrialResult]]:
    """Saves the best trial's model to ``output_dir``; returns the winner and every trial.

    Without folds, the model saved is the winning trial's final epoch: the
    weights its objective scored. It reads the oracle's files and the winner's
    weights file, nothing else. With k-fold cross-validation, the best
    hyperparameters are trained once more, for ``trial_epochs``, on the whole
    training split, as GridSearchCV's ``refit`` does (resumably, in the
    winner's folder); the objective is then the mean of the folds' scores, as
    GridSearchCV's ``best_score_``.
    """
    import tempfile

    import tensorflow as tf

    root = config.search_state_uri.rstrip("/")
    with search_state.opened(root, write=False) as oracle_dir:
        winner, trials = best(oracle_dir), results(oracle_dir)
    info = dataset.DatasetInfo.load(dataset_dir)
    with tempfile.TemporaryDirectory() as work:
        weights_uri = f"{trial_uri(root, winner.trial_id)}/{WEIGHTS_FILE}"
        if config.folds == 1 and storage.exists(weights_uri):
            # Uncompiled: the file holds the model's weights only, no optimizer state to restore.
            model = build_for_trial(winner.values, info, config, compile=False)
            model.load_weights(storage.fetch(weights_uri, work))
        else:
            tf.keras.utils.set_random_seed(config.seed)
            model = build_for_trial(winner.values, info, config)
            spec = AugmentSpec.from_dict(info.augment) if info.augment else None
            batch_size = int(winner.values.get("batch_size", config.batch_size))
            # Resumable like a trial, in the winner's folder: a retried step picks the refit up where it stopped.
            own = storage.mirror(trial_uri(root, winner.trial_id))
            train = dataset.epoch_split(dataset_dir, "train")
            with own as trial_dir:
                training.fit(model, REFIT, training_batches(train, spec, batch_size, config.seed), trial_dir,
                             epochs=config.trial_epochs, after_epoch=own.sync, verbose=verbose)
    hyper = {"batch_size": config.batch_size, "learning_rate": config.learning_rate, **winner.values}
    models.save(
        model,
        output_dir,
        models.ModelMeta(family=config.model, class_names=info.class_names, input_shape=list(info.shape),
                         hyperparameters=hyper, stage="baseline"),
    )
    return winner, trials


def trials_markdown(config: SearchConfig, winner: TrialResult, trials: list[TrialResult]) -> str:
    """The trials table of the search result's Markdown artifact."""
    from kftune import report

    names = sorted({k for t in trials for k in t.values})
    rows = [[t.trial_id, *[t.values.get(n, "") for n in names],
             f"{t.objective:.4f}" if t.objective is not None else "",
             " ".join(f"{s:.3f}" for s in t.fold_scores), t.epochs, t.seconds,
             t.status + (f": {t.error}" if t.error else "")]
            for t in trials]
    head = f"## {config.search_algorithm} search: best trial {winner.trial_id} ({winner.objective:.4f})\n\n"
    return head + report.markdown_table(["trial", *names, "objective", "fold scores", "epochs", "seconds", "status"], rows)


def trials_figure(trials: list[TrialResult]) -> str:
    """Objective per trial and the best so far, as an inline figure."""
    from kftune import report

    fig, ax = report.pyplot().subplots(figsize=(6, 3.5))
    done = [t for t in trials if t.objective is not None]
    ax.plot([int(t.trial_id) for t in done], [t.objective for t in done], "o-", label="trial")
    best_so_far = [max(t.objective for t in done[: i + 1]) for i in range(len(done))]
    ax.step([int(t.trial_id) for t in done], best_so_far, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val_accuracy")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    ax.legend()
    return report.figure(fig)


if __name__ == "__main__":
    import sys

    sys.exit(_serve(int(sys.argv[1])))
