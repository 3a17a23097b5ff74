"""The search's result: the winner's model, the trials table, and the Run UI's pictures."""

from __future__ import annotations

from pathlib import Path

from kftune import dataset, models, search_state, storage, training
from kftune.augment import AugmentSpec, training_batches
from kftune.search.config import OPTUNA_ALGORITHMS, SearchConfig
from kftune.search.oracles import best, results
from kftune.search.trials import (
    REFIT,
    STOPPED,
    WEIGHTS_FILE,
    TrialResult,
    build_for_trial,
    trial_uri,
)


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


def importance(config: SearchConfig, state_uri: str | Path) -> dict[str, float]:
    """Optuna's parameter importance (fANOVA) when the algorithm is Optuna's; empty otherwise or when it cannot
    tell yet (fewer than 2 completed trials)."""
    if config.search_algorithm not in OPTUNA_ALGORITHMS:
        return {}
    from kftune.search.oracles import optuna as adapter

    with search_state.opened(state_uri, write=False) as state_dir:
        return adapter.importance(config, state_dir)


def _status(t: TrialResult) -> str:
    if t.status == STOPPED:
        return f"stopped after epoch {t.stopped_at}"
    return t.status + (f": {t.error}" if t.error else "")


def trials_markdown(config: SearchConfig, winner: TrialResult, trials: list[TrialResult],
                    importances: dict[str, float] | None = None) -> str:
    """The trials table of the search result's Markdown artifact (and Optuna's parameter importance)."""
    from kftune import report

    names = sorted({k for t in trials for k in t.values})
    rows = [[t.trial_id, *[t.values.get(n, "") for n in names],
             f"{t.objective:.4f}" if t.objective is not None else "",
             " ".join(f"{s:.3f}" for s in t.fold_scores), t.epochs, t.seconds, _status(t)]
            for t in trials]
    stopping = "" if not config.stops_early else (
        " (successive halving)" if config.search_algorithm == "asha" else f" (early stopping: {config.early_stopping})")
    head = f"## {config.search_algorithm} search{stopping}: best trial {winner.trial_id} ({winner.objective:.4f})\n\n"
    text = head + report.markdown_table(["trial", *names, "objective", "fold scores", "epochs", "seconds", "status"],
                                        rows)
    if importances:
        text += ("\n\n## Parameter importance (Optuna, fANOVA over the completed trials)\n\n"
                 + report.markdown_table(["parameter", "importance"],
                                         [[k, f"{v:.3f}"] for k, v in importances.items()]))
    return text


def curves_figure(trials: list[TrialResult]) -> str:
    """Each trial's learning curve (val_accuracy per epoch), an x where early stopping stopped it."""
    from kftune import report

    fig, ax = report.pyplot().subplots(figsize=(7, 3.5))
    for t in trials:
        if not t.curve:
            continue
        epochs, scores = zip(*t.curve, strict=True)
        line, = ax.plot(epochs, scores, "-", marker=".", linewidth=1, alpha=0.8)
        if t.status == STOPPED:
            ax.plot([epochs[-1]], [scores[-1]], "x", color=line.get_color(), markersize=9, markeredgewidth=2)
    ax.plot([], [], "kx", label="stopped early")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_accuracy")
    ax.set_title("Learning curve of each trial")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right")
    return report.figure(fig)


def importance_figure(importances: dict[str, float]) -> str:
    """Optuna's parameter importance as horizontal bars."""
    from kftune import report

    fig, ax = report.pyplot().subplots(figsize=(6, 0.5 + 0.4 * len(importances)))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (Optuna, fANOVA)")
    return report.figure(fig)


def trials_page(config: SearchConfig, trials: list[TrialResult], importances: dict[str, float] | None = None) -> str:
    """The search page of the Run UI: learning curves, objective per trial, Optuna's parameter importance."""
    from kftune import report

    parts = [curves_figure(trials), trials_figure(trials)]
    if importances:
        parts.append(importance_figure(importances))
    return report.page(f"Search ({config.search_algorithm}): learning curves and objective per trial", *parts)


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
