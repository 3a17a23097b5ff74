"""How to search: the search step's config (its fields are pipeline parameters, see kftune.parameters)."""

from __future__ import annotations

import dataclasses
import logging

from kftune import models, storage
from kftune.errors import InputError, check_numbers, check_whole_numbers
from kftune.search.space import CLASSIC_SPACE_YAML, SearchSpace

log = logging.getLogger(__name__)

# keras-tuner's oracles, then Optuna's TPE sampler and asynchronous successive halving (TPE with its pruner).
KERAS_TUNER_ALGORITHMS = ("grid", "random", "bayesian", "hyperband")
OPTUNA_ALGORITHMS = ("tpe", "asha")
ALGORITHMS = KERAS_TUNER_ALGORITHMS + OPTUNA_ALGORITHMS
EARLY_STOPPING = ("none", "median")
# Upper bounds that catch a typo (max_trials=100000) before it books GPUs for days.
MAX_TRIALS, MAX_PARALLEL = 10_000, 64


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How to search.

    Attributes:
        search_space: YAML search space, name: {type: float/int/choice/bool/fixed, min,
            max, step, sampling: log, values, when: {parent: [values]}}, e.g.
            {learning_rate: {type: float, min: 0.0001, max: 0.01, sampling: log}}.
        search_algorithm: grid, random, bayesian or hyperband (keras-tuner's
            oracles), tpe (Optuna's TPE sampler) or asha (asynchronous
            successive halving: TPE with Optuna's SuccessiveHalvingPruner, which
            stops a trial after epoch 1, 3, 9... unless it is in the top third at
            that epoch; no worker waits for others).
        max_trials: Trials to run (grid: at most the grid's size; Hyperband
            budgets by ``trial_epochs`` instead).
        early_stopping: none, or median (Katib's medianstop, Optuna's
            MedianPruner): once 3 trials have completed, any trial whose score
            at an epoch is below the median of completed trials at that epoch
            stops there. For any algorithm but asha, which stops trials itself.
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
    early_stopping: str = "none"
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
        if self.early_stopping not in EARLY_STOPPING:
            raise InputError(f"`early_stopping` must be one of {EARLY_STOPPING}. Received: "
                             f"early_stopping={self.early_stopping!r}")
        if self.early_stopping != "none" and self.search_algorithm == "asha":
            raise InputError(f"`early_stopping`={self.early_stopping} with search_algorithm=asha: asha stops trials "
                             "itself (successive halving). Set early_stopping=none, or use search_algorithm=tpe.")
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

    @property
    def stops_early(self) -> bool:
        """Whether a trial reports each epoch's score and may be stopped (asha, early_stopping=median)."""
        return self.search_algorithm == "asha" or self.early_stopping != "none"

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
        if self.search_algorithm in OPTUNA_ALGORITHMS:
            from kftune.search.oracles import optuna as adapter

            adapter.check_space(space)
        if self.search_algorithm == "grid":
            for p in space.params:
                if p.type == "float" and not p.step:
                    raise InputError(
                        f"search space `{p.name}`: grid search needs a `step` for a float, or declare it as a choice."
                    )


