"""Every use kftune makes of keras-tuner's private members, in one place.

kftune drives keras-tuner's oracles from many processes that share one state
folder, which keras-tuner's public API does not cover (its own distributed
mode keeps the oracle in one long-lived chief process). What that takes:

* the grid oracle keeps its place in the grid in memory only, so it is saved
  with the oracle's state here;
* ``Oracle.reload`` sends every trial that was running back for a retry, which
  is right for one process restarting and wrong for many workers that each
  reload the state: another worker's trial would be handed out twice. The
  ongoing trials are put back here, so only a worker that was itself
  restarted gets its own trial back (``create_trial`` with the same tuner id);
* a finished trial is taken off the retry queue when it is told;
* the Bayesian oracle's Gaussian-process step does not check its proposal
  against the points already tried (only its random initial points are), so on
  a discrete space it proposes the same configuration again and again. Its
  proposal is checked here, and a repeat is replaced by an untried random point
  before it becomes a trial.

tests/test_tuner_compat.py pins these to keras-tuner 1.4.8 (the version
pyproject.toml allows); an upgrade that changes them fails there first.
"""

from __future__ import annotations

import json
from pathlib import Path

KERAS_TUNER_VERSION = "1.4.8"


def resumable_grid_oracle():
    """keras-tuner's grid oracle, with its place in the grid kept in its saved state."""
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


def distinct_bayesian_oracle():
    """keras-tuner's Bayesian oracle, never proposing a configuration it has already tried.

    A repeated proposal is replaced by an untried random point (keras-tuner's own
    duplicate-free sampler); when no untried point is left, the search stops.
    Either way the repeat never becomes a trial, so it costs no training and no
    place in ``max_trials``.
    """
    import keras_tuner as kt

    class DistinctBayesianOptimizationOracle(kt.oracles.BayesianOptimizationOracle):
        def populate_space(self, trial_id):
            proposal = super().populate_space(trial_id)
            if proposal["status"] == kt.engine.trial.TrialStatus.RUNNING and self._duplicate(proposal["values"]):
                return self._random_populate_space()
            return proposal

    return DistinctBayesianOptimizationOracle


def open_project(oracle, state_dir: str | Path, project: str) -> None:
    """Points ``oracle`` at its files and loads them if there are any, keeping other workers' trials theirs."""
    oracle._set_project_dir(str(state_dir), project)
    oracle.verbose = 0
    saved = Path(state_dir, project, "oracle.json")
    if not saved.exists():
        return
    oracle.reload()
    # reload() queued every ongoing trial for a retry; they are still running in their workers.
    ongoing = json.loads(saved.read_text()).get("ongoing_trials", {})
    oracle.ongoing_trials = {tuner_id: oracle.trials[trial_id] for tuner_id, trial_id in ongoing.items()
                             if trial_id in oracle.trials}
    running = {t.trial_id for t in oracle.ongoing_trials.values()}
    oracle._retry_queue = [trial_id for trial_id in oracle._retry_queue if trial_id not in running]


def forget_retry(oracle, trial_id: str) -> None:
    """Takes a trial that is being told off the retry queue."""
    if trial_id in oracle._retry_queue:
        oracle._retry_queue.remove(trial_id)


def trial_dir(oracle, trial_id: str) -> str:
    return oracle._get_trial_dir(trial_id)
