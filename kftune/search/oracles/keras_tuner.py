"""keras-tuner's oracles (grid, random, bayesian, hyperband) behind kftune's ask and tell.

keras-tuner's Tuner classes only accept Keras 3 models, so kftune drives the
oracle itself, from many processes that share one state: every use of
keras-tuner's private members is in :mod:`kftune.tuner_compat`.
"""

from __future__ import annotations

from pathlib import Path

from kftune.search.config import SearchConfig
from kftune.search.trials import COMPLETED, STOPPED, TrialResult


def _oracle(config: SearchConfig, oracle_dir: str | Path):
    import keras_tuner as kt

    from kftune import tuner_compat
    from kftune.search.oracles import PROJECT

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


def ask(config: SearchConfig, oracle_dir: Path, worker: str) -> tuple[str, dict | None]:
    import keras_tuner as kt

    from kftune.search.oracles import IDLE, RUNNING
    from kftune.search.oracles import STOPPED as DONE

    oracle = _oracle(config, oracle_dir)
    trial = oracle.create_trial(worker)
    oracle.save()
    if trial.status == kt.engine.trial.TrialStatus.RUNNING:
        return RUNNING, {"trial_id": trial.trial_id, "values": dict(trial.hyperparameters.values)}
    return (DONE, None) if trial.status == kt.engine.trial.TrialStatus.STOPPED else (IDLE, None)


def tell(config: SearchConfig, oracle_dir: Path, results: list[TrialResult]) -> list[TrialResult]:
    """Ends the trials in the oracle and saves it; returns the results it took (trials it knows)."""
    import keras_tuner as kt

    from kftune import tuner_compat

    oracle = _oracle(config, oracle_dir)
    Status = kt.engine.trial.TrialStatus
    taken = []
    for result in results:
        trial = oracle.trials.get(result.trial_id)
        if trial is None or trial.status in (Status.COMPLETED, Status.FAILED):
            continue  # a result told twice (a retried worker) changes nothing
        tuner_compat.forget_retry(oracle, result.trial_id)
        if result.status in (COMPLETED, STOPPED):
            # keras-tuner has no stopped trials: one stopped early counts with the score of the weights it keeps.
            oracle.update_trial(result.trial_id, {"val_accuracy": result.objective}, step=result.epochs)
            trial.status = Status.COMPLETED
        else:
            trial.status = Status.FAILED
            trial.message = result.error
        oracle.ongoing_trials = {k: t for k, t in oracle.ongoing_trials.items() if t.trial_id != result.trial_id}
        oracle.end_trial(trial)
        taken.append(result)
    oracle.save()
    return taken
