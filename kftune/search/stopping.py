"""Early stopping: asha's successive halving and ``early_stopping=median``, as Optuna's pruners decide them.

A trial that may stop early reports its score after each epoch (an oracle
turn, :func:`kftune.search.oracles.report_epoch`). The scores are kept in the
search's state as ``curves.json`` (per trial: its scores by epoch, the rung
values successive halving recorded, the epoch it was stopped at), whatever the
algorithm, so early stopping works the same with keras-tuner's oracles. Each
report rebuilds a study of every trial that reported (completed ones with their
objective, stopped ones as pruned, running ones as running) and asks Optuna's
pruner about the reporting trial: no trial waits for a rung to fill.
"""

from __future__ import annotations

import json
from pathlib import Path

from kftune.search.config import SearchConfig
from kftune.search.trials import COMPLETED, STOPPED, TrialResult

CURVES_FILE = "curves.json"
# Katib's medianstop default (min_trials_required): the median of fewer completed trials says little.
MEDIAN_STARTUP_TRIALS = 3


def pruner(config: SearchConfig):
    """Optuna's pruner for the config: asha's SuccessiveHalvingPruner, the MedianPruner, or None."""
    import optuna

    if config.search_algorithm == "asha":
        # Rungs after epoch 1, factor, factor^2...: the top 1/factor at a rung train on.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=config.hyperband_factor)
    if config.early_stopping == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    return None


def load(state_dir: str | Path) -> dict:
    path = Path(state_dir, CURVES_FILE)
    return json.loads(path.read_text()) if path.exists() else {}


def report(config: SearchConfig, state_dir: Path, trial_id: str, epoch: int, score: float,
           told: dict[str, TrialResult]) -> bool:
    """Records ``score`` at ``epoch`` for a running trial; True when the pruner stops it there."""
    from kftune.search.oracles.optuna import quiet

    curves = load(state_dir)
    own = curves.setdefault(trial_id, {"scores": {}, "attrs": {}, "stopped_at": 0})
    if own["stopped_at"]:
        return True  # stopped before its process was killed: it stops again, at once
    own["scores"][str(epoch)] = score
    chosen = pruner(config)
    stop = False
    if chosen is not None:
        with quiet() as optuna:
            from optuna.trial import TrialState, create_trial

            study = optuna.create_study(direction="maximize")
            order = list(curves)
            for tid in order:
                entry, result = curves[tid], told.get(tid)
                state = TrialState.RUNNING
                if result is not None:
                    state = {COMPLETED: TrialState.COMPLETE, STOPPED: TrialState.PRUNED}.get(result.status,
                                                                                          TrialState.FAIL)
                study.add_trial(create_trial(
                    state=state, value=result.objective if state == TrialState.COMPLETE else None,
                    intermediate_values={int(k): v for k, v in entry["scores"].items()},
                    system_attrs=dict(entry["attrs"])))
            index = order.index(trial_id)
            stop = bool(chosen.prune(study, study.get_trials(deepcopy=False)[index]))
            own["attrs"] = dict(study.get_trials(deepcopy=False)[index].system_attrs)
    if stop:
        own["stopped_at"] = epoch
    Path(state_dir, CURVES_FILE).write_text(json.dumps(curves, sort_keys=True))
    return stop
