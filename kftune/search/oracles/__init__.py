"""The search's engine: one oracle interface over the libraries' algorithms, and the search's state.

Each algorithm comes from a library made for it, behind one adapter per
library: keras-tuner's oracles (grid, random, bayesian, hyperband;
:mod:`.keras_tuner`) and Optuna's sampler and pruner (tpe, asha;
:mod:`.optuna`). Every adapter has the same two verbs, Optuna's ask and tell
over a stored state, and the engine adds what they share:

* :func:`ask` hands a worker its next trial (or its own unfinished one back);
* :func:`tell` records finished trials (each trial's ``result.json``);
* :func:`report_epoch` is a trial's per-epoch score, answered with whether it stops
  there (asha's successive halving, ``early_stopping=median``: :mod:`kftune.search.stopping`);
* :func:`results`, :func:`best`, :func:`told` read what was told.

A search's state (``search_state_uri``) is laid out so that each step moves
only what it needs::

    oracle-state.json.gz   the adapter's files (keras-tuner's oracle.json and trial_*/trial.json,
                           or Optuna's trials as optuna.json), kftune.json (the algorithm), curves.json
                           (per-epoch scores of trials that may stop early) and each told trial's
                           result.json, as one document replaced whole by each oracle turn
                           (kftune.search_state): kilobytes per trial
    oracle.lock            held by the worker taking its turn at the oracle
    trials/trial_<id>/     one trial's epoch log, backups and final weights

An oracle turn reads and writes the document only; a trial reads and writes
its own folder; the result step reads the document and the winner's weights file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from kftune import search_state
from kftune.errors import InputError
from kftune.search.config import KERAS_TUNER_ALGORITHMS, SearchConfig
from kftune.search.trials import COMPLETED, TrialResult
from kftune.search.trials import STOPPED as STOPPED_TRIAL

PROJECT = "kftune_search"
RESULT_FILE = "result.json"
LOCK_FILE = "oracle.lock"
# Which algorithm wrote the state: a search is resumed only by its own algorithm.
MARKER_FILE = "kftune.json"
# How long a worker waits, in all, for a Hyperband bracket or grid step other workers are finishing.
IDLE_TIMEOUT_S = 6 * 3600.0

RUNNING, IDLE, STOPPED = "RUNNING", "IDLE", "STOPPED"


def _adapter(config: SearchConfig):
    if config.search_algorithm in KERAS_TUNER_ALGORITHMS:
        from kftune.search.oracles import keras_tuner as adapter
    else:
        from kftune.search.oracles import optuna as adapter
    return adapter


def _stored_algorithm(state_dir: Path) -> str | None:
    marker = state_dir / MARKER_FILE
    if marker.exists():
        return json.loads(marker.read_text())["search_algorithm"]
    if (state_dir / PROJECT / "oracle.json").exists():
        return "keras-tuner"  # a state from before the marker: one of keras-tuner's four
    return None


def check_algorithm(config: SearchConfig, state_dir: str | Path) -> None:
    """Refuses a state written by another algorithm, which this one cannot read or would misread."""
    stored = _stored_algorithm(Path(state_dir))
    if stored is None or stored == config.search_algorithm or (
            stored == "keras-tuner" and config.search_algorithm in KERAS_TUNER_ALGORITHMS):
        return
    raise InputError(
        f"`search_state_uri` `{config.search_state_uri}` holds a search run with search_algorithm={stored}, which "
        f"search_algorithm={config.search_algorithm} cannot continue: set search_algorithm={stored} to resume it, "
        "or give a new search_state_uri to start a new search.")


def ask(config: SearchConfig, state_dir: str | Path, worker: str = "worker0") -> tuple[str, dict | None]:
    """Asks the oracle for ``worker``'s next trial.

    Returns ``(RUNNING, {"trial_id": ..., "values": {...}, "first": ...})``;
    ``(IDLE, None)`` while the oracle waits for other workers' trials (a
    Hyperband bracket, the grid's next step); ``(STOPPED, None)`` once the search
    is done for this worker. A worker that was stopped part-way gets its own
    unfinished trial back first. ``first``: no trial has completed yet.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    check_algorithm(config, state_dir)
    marker = state_dir / MARKER_FILE
    if not marker.exists():
        marker.write_text(json.dumps({"search_algorithm": config.search_algorithm}))
    status, trial = _adapter(config).ask(config, state_dir, worker)
    if trial is not None:
        # "first": no trial has completed yet, so a model function that fails here may be no builder at all.
        trial["first"] = not any(r.status == COMPLETED for r in results(state_dir))
    return status, trial


def _result_file(state_dir: str | Path, trial_id: str) -> Path:
    return Path(state_dir, PROJECT, f"trial_{trial_id}", RESULT_FILE)


def tell(config: SearchConfig, state_dir: str | Path, told_now: list[TrialResult]) -> None:
    """Reports finished trials to the oracle; a result told twice (a retried worker) changes nothing."""
    check_algorithm(config, state_dir)
    new = [r for r in told_now if not _result_file(state_dir, r.trial_id).exists()]
    for result in _adapter(config).tell(config, Path(state_dir), new):
        path = _result_file(state_dir, result.trial_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(result.to_json())


def report_epoch(config: SearchConfig, state_dir: str | Path, trial_id: str, epoch: int, score: float) -> bool:
    """Records a running trial's score after ``epoch``; True when early stopping stops it there."""
    from kftune.search import stopping

    check_algorithm(config, state_dir)
    return stopping.report(config, Path(state_dir), trial_id, epoch, score,
                           {r.trial_id: r for r in results(state_dir)})


def results(state_dir: str | Path) -> list[TrialResult]:
    """Every trial told so far, in trial order."""
    found = [TrialResult.from_json(p.read_text()) for p in Path(state_dir, PROJECT).glob(f"trial_*/{RESULT_FILE}")]
    return sorted(found, key=lambda r: int(r.trial_id))


def best(state_dir: str | Path) -> TrialResult:
    """The best completed trial (a stopped one only when none completed): the highest objective, then the earliest."""
    told_all = results(state_dir)
    done = [r for r in told_all if r.status == COMPLETED and r.objective is not None] or [
        r for r in told_all if r.status == STOPPED_TRIAL and r.objective is not None]
    if not done:
        failed = [r for r in told_all if r.error]
        why = f" The first error: trial {failed[0].trial_id}: {failed[0].error}." if failed else ""
        raise InputError(
            f"no trial completed.{why} Read the trials' errors in the search logs and fix the space or model."
        )
    return max(done, key=lambda r: (r.objective, -int(r.trial_id)))


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
