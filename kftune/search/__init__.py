"""Hyperparameter search: a YAML search space, the libraries' algorithms, and parallel workers.

One module per concept, as keras-tuner separates its engine, oracles and tuners:

* :mod:`.space`: the search space, declared in YAML and validated;
* :mod:`.config`: how to search (the search step's pipeline parameters);
* :mod:`.oracles`: one ask/tell interface over keras-tuner's oracles (grid,
  random, bayesian, hyperband) and Optuna's sampler (tpe, asha), one adapter per
  library, and the state they share;
* :mod:`.stopping`: early stopping (asha, ``early_stopping=median``) by Optuna's pruners;
* :mod:`.trials`: one trial's resumable training;
* :mod:`.worker`: the workers that run trials in child processes;
* :mod:`.report`: the winner's model, the trials table and pictures.

The components, the CLI, the benchmarks and the tests use the names below, from
``from kftune import search``.
"""

from kftune.search.config import (
    ALGORITHMS,
    EARLY_STOPPING,
    KERAS_TUNER_ALGORITHMS,
    MAX_PARALLEL,
    MAX_TRIALS,
    OPTUNA_ALGORITHMS,
    SearchConfig,
)
from kftune.search.oracles import (
    IDLE,
    IDLE_TIMEOUT_S,
    LOCK_FILE,
    PROJECT,
    RESULT_FILE,
    RUNNING,
    STOPPED,
    ask,
    best,
    oracle_turn,
    report_epoch,
    results,
    tell,
    told,
)
from kftune.search.report import (
    curves_figure,
    importance,
    importance_figure,
    save_best_model,
    trials_figure,
    trials_markdown,
    trials_page,
)
from kftune.search.space import CLASSIC_SPACE_YAML, PARAM_TYPES, SAMPLINGS, Param, SearchSpace
from kftune.search.trials import (
    REFIT,
    TRIALS_DIR,
    WEIGHTS_FILE,
    TrialResult,
    build_for_trial,
    model_arguments,
    own_values,
    run_stored_trial,
    run_trial,
    trial_uri,
)
from kftune.search.worker import TRIALS_PER_PROCESS, TrialProcess, search, work

__all__ = [
    "ALGORITHMS", "CLASSIC_SPACE_YAML", "EARLY_STOPPING", "IDLE", "IDLE_TIMEOUT_S", "KERAS_TUNER_ALGORITHMS",
    "LOCK_FILE", "MAX_PARALLEL", "MAX_TRIALS", "OPTUNA_ALGORITHMS", "PARAM_TYPES", "PROJECT", "REFIT",
    "RESULT_FILE", "RUNNING", "SAMPLINGS", "STOPPED", "TRIALS_DIR", "TRIALS_PER_PROCESS", "WEIGHTS_FILE", "Param",
    "SearchConfig", "SearchSpace", "TrialProcess", "TrialResult", "ask", "best", "build_for_trial", "curves_figure", "importance", "importance_figure",
    "model_arguments", "oracle_turn", "own_values", "report_epoch", "results", "run_stored_trial", "run_trial", "save_best_model",
    "search", "tell", "told", "trial_uri", "trials_figure", "trials_markdown", "trials_page", "work",
]
