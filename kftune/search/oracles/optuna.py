"""Optuna's TPE sampler (tpe, and asha's sampler) behind kftune's ask and tell.

kftune keeps its one search-state document: Optuna's trials are stored in it
as ``optuna.json`` (each trial's parameters, distributions, state and value),
and each ask rebuilds an in-memory study from them (``create_trial`` +
``add_trial``) and asks it for the next trial. Running trials go in as running,
and TPE's ``constant_liar`` keeps parallel workers from being handed the same
point; nobody waits for anybody. The sampler is seeded by the search's seed and
the number of trials asked so far, so the same seed gives the same trials.
Asha's stopping is Optuna's SuccessiveHalvingPruner (:mod:`kftune.search.stopping`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from kftune.errors import InputError
from kftune.search.config import SearchConfig
from kftune.search.space import SearchSpace
from kftune.search.trials import COMPLETED, STOPPED, TrialResult

STATE_FILE = "optuna.json"
# A proposal already tried is asked again with another seed, at most this many times, then drawn at random.
DUPLICATE_TRIES = 20


@contextlib.contextmanager
def quiet():
    """Optuna without its INFO lines per study and its warning that constant_liar is experimental."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield optuna
    finally:
        optuna.logging.set_verbosity(level)


def distributions(space: SearchSpace) -> dict:
    """Each tunable parameter as an Optuna distribution (fixed parameters are not tuned)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for p in space.params:
        if p.type == "fixed":
            continue
        where = f"search space `{p.name}`"
        if p.sampling == "reverse_log":
            raise InputError(f"{where}: Optuna (search_algorithm=tpe or asha) has no reverse_log sampling: use "
                             "sampling: log or linear, or a keras-tuner algorithm.")
        try:
            if p.type == "float":
                out[p.name] = FloatDistribution(p.min, p.max, log=p.sampling == "log", step=p.step)
            elif p.type == "int":
                out[p.name] = IntDistribution(int(p.min), int(p.max), log=p.sampling == "log", step=int(p.step or 1))
            elif p.type == "choice":
                out[p.name] = CategoricalDistribution(list(p.values))
            else:
                out[p.name] = CategoricalDistribution([False, True])
        except ValueError as e:
            raise InputError(f"{where}: Optuna (search_algorithm=tpe or asha) cannot take it: "
                             f"{str(e).splitlines()[0]} Change the space, or use a keras-tuner algorithm.") from e
    return out


def check_space(space: SearchSpace) -> None:
    """Refuses, before any trial, a space Optuna cannot sample."""
    distributions(space)


def _load(state_dir: Path) -> dict:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"trials": []}


def _save(state_dir: Path, document: dict) -> None:
    (state_dir / STATE_FILE).write_text(json.dumps(document, sort_keys=True))


def study(document: dict, sampler=None):
    """An in-memory study holding every trial of ``document`` as Optuna has it."""
    with quiet() as optuna:
        from optuna.distributions import json_to_distribution
        from optuna.trial import TrialState, create_trial

        states = {"RUNNING": TrialState.RUNNING, "COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED,
                  "FAIL": TrialState.FAIL}
        built = optuna.create_study(direction="maximize", sampler=sampler)
        for t in document["trials"]:
            built.add_trial(create_trial(
                state=states[t["state"]], value=t.get("value") if t["state"] == "COMPLETE" else None,
                params=t["params"], distributions={k: json_to_distribution(v) for k, v in t["distributions"].items()},
                intermediate_values={int(k): v for k, v in t.get("intermediate", {}).items()}))
        return built


def _sampler(config: SearchConfig, seed: int):
    from optuna.samplers import TPESampler

    # As keras-tuner's Bayesian oracle: a third of the trials (at least 2) random before the model takes over.
    return TPESampler(seed=seed, n_startup_trials=max(2, config.max_trials // 3), constant_liar=True)


def _random_sampler(seed: int):
    from optuna.samplers import RandomSampler

    return RandomSampler(seed=seed)


def _suggest(trial, space: SearchSpace, dists: dict) -> dict:
    """The trial's values, define-by-run: a conditional parameter only when its parent has one of its values."""
    values: dict = {}
    for p in space.params:
        if p.when and values.get(p.when[0]) not in p.when[1]:
            continue
        values[p.name] = p.value if p.type == "fixed" else _suggest_one(trial, p.name, dists[p.name])
    return values


def _suggest_one(trial, name: str, dist):
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)


def ask(config: SearchConfig, state_dir: Path, worker: str) -> tuple[str, dict | None]:
    from optuna.distributions import distribution_to_json

    from kftune.search.oracles import RUNNING
    from kftune.search.oracles import STOPPED as DONE

    document = _load(state_dir)
    for t in document["trials"]:
        if t["state"] == "RUNNING" and t["worker"] == worker:
            return RUNNING, {"trial_id": t["trial_id"], "values": t["values"]}  # its own unfinished trial, again
    if len(document["trials"]) >= config.max_trials:
        return DONE, None  # every trial is handed out: this worker is done; the others finish theirs
    space, dists = config.space, distributions(config.space)
    tried = [t["values"] for t in document["trials"]]
    number = len(document["trials"])
    for attempt in range(2 * DUPLICATE_TRIES):
        # TPE's pick on a discrete space often repeats whatever its seed: after DUPLICATE_TRIES repeats, an
        # untried random point instead (as kftune's Bayesian oracle does); a space with none left repeats.
        seed = config.seed + number + 7919 * attempt
        sampler = _sampler(config, seed) if attempt < DUPLICATE_TRIES else _random_sampler(seed)
        asked = study(document, sampler)
        with quiet():
            trial = asked.ask()
            values = _suggest(trial, space, dists)
        if values not in tried:
            break
    document["trials"].append({
        "trial_id": f"{number:0{len(str(config.max_trials))}d}", "number": number, "worker": worker,
        "state": "RUNNING", "values": values, "params": dict(trial.params),
        "distributions": {k: distribution_to_json(v) for k, v in trial.distributions.items()},
    })
    _save(state_dir, document)
    return RUNNING, {"trial_id": document["trials"][-1]["trial_id"], "values": values}


def tell(config: SearchConfig, state_dir: Path, results: list[TrialResult]) -> list[TrialResult]:
    """Finishes the trials in the stored study: COMPLETE, PRUNED (stopped early) or FAIL."""
    document = _load(state_dir)
    by_id = {t["trial_id"]: t for t in document["trials"]}
    taken = []
    for result in results:
        t = by_id.get(result.trial_id)
        if t is None or t["state"] != "RUNNING":
            continue
        t["state"] = {COMPLETED: "COMPLETE", STOPPED: "PRUNED"}.get(result.status, "FAIL")
        t["value"] = result.objective
        # A pruned trial's curve is what TPE weighs it by; Optuna orders pruned trials by their last step.
        t["intermediate"] = {str(epoch): score for epoch, score in result.curve}
        taken.append(result)
    _save(state_dir, document)
    return taken


def importance(config: SearchConfig, state_dir: str | Path) -> dict[str, float]:
    """Optuna's parameter importance (fANOVA) over the completed trials; empty when it cannot tell (< 2 trials)."""
    with quiet() as optuna:
        built = study(_load(Path(state_dir)))
        try:
            return dict(optuna.importance.get_param_importances(
                built, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=config.seed)))
        except (ValueError, RuntimeError):
            return {}
