"""Search components: a keras-tuner oracle asked and told across parallel trial tasks.

The pipeline runs them as rounds (see pipelines/tuning_pipeline.py):
``search_setup`` validates once; each round ``search_ask`` asks the oracle
for trials, a ParallelFor of ``search_trial`` trains them in parallel pods,
``search_tell`` reports their results; ``search_result`` writes the winner.
The oracle's state (keras-tuner's files) lives at ``state_uri``, so every round
sees all earlier results, and a rerun with the same ``state_uri`` resumes.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_setup(
    space: str,
    pipeline_root: str,
    run_id: str,
    algorithm: str,
    max_trials: int,
    epochs: int,
    folds: int,
    seed: int,
    model: str,
    state_uri: str,
    plan: Output[Artifact],
):
    """Validates the search space and settings before any trial runs.

    Args:
        space: YAML search space, e.g. {learning_rate: {type: float, min: 1e-4,
            max: 1e-2, sampling: log}, batch_size: {type: choice, values: [16, 32]}}.
        pipeline_root: The run's pipeline root (set by the pipeline).
        run_id: The run's id (set by the pipeline).
        algorithm: grid, random, bayesian or hyperband (keras-tuner oracles).
        max_trials: Most trials to run (Hyperband budgets by epochs instead).
        epochs: Epochs per trial (Hyperband: the most any trial trains).
        folds: k-fold cross-validation when > 1, like GridSearchCV(cv=k).
        seed: Same seed, same trials.
        model: small_cnn or your own module:function.
        state_uri: Where the oracle's state lives; empty: under the pipeline
            root, per run. Reuse a URI to resume a stopped search.

        plan: Output: the validated settings (JSON), read by the other search steps.
    """
    from kftune import search
    from kftune.errors import user_errors

    with user_errors():
        config = search.SearchConfig(algorithm=algorithm, max_trials=max_trials, epochs=epochs, folds=folds,
                                     seed=seed, model=model)
        state = state_uri or f"{pipeline_root.rstrip('/')}/kftune-search/{run_id}"
        validated = search.SearchPlan.create(space, config, state)
    # A file, not a string parameter: kfp.local 2.17 replaces every task-output
    # parameter that enters a loop with the loop item.
    with open(plan.path, "w") as f:
        f.write(validated.to_json())
    plan.metadata.update({"algorithm": algorithm, "state_uri": state})
    print(f"search: {algorithm}, state at {state}")


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_round_list(rounds: int) -> list:
    """Lists the search rounds for the pipeline's loop (KFP pipelines have no loops of their own).

    Args:
        rounds: Rounds of parallel trials; rounds after the search is done end at once.

    Returns:
        One item per round.
    """
    from kftune.errors import InputError, user_errors

    with user_errors():
        if rounds < 1:
            raise InputError(f"`search_rounds` must be at least 1. Received: search_rounds={rounds}")
    return list(range(rounds))


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_ask(plan: Input[Artifact], count: int, round_index: int) -> list:
    """Asks the oracle for this round's trials.

    Args:
        plan: From search_setup.
        count: Trials per round: how many trial tasks run in parallel.
        round_index: Which round this is (the loop item).

    Returns:
        The round's trials ({trial_id, values}); empty once the search is done.
    """
    from kftune import search, storage
    from kftune.errors import user_errors

    plan_ = search.SearchPlan.read(plan.path)
    with user_errors(), storage.mirror(plan_.state_uri) as state:
        trials = search.ask(plan_.space, plan_.config, state, count)
    print(f"search: round {round_index} runs {len(trials)} trial(s): {[t['trial_id'] for t in trials]}")
    return trials


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_trial(dataset: Input[Dataset], plan: Input[Artifact], trial: dict) -> str:
    """Trains one trial in its own pod; a crash is recorded as a failed trial.

    Args:
        dataset: The training data.
        plan: From search_setup.
        trial: One item of search_ask's list.

    Returns:
        The trial's result as JSON (objective, fold scores, epochs, time, status).
    """
    from kftune import search, storage
    from kftune.errors import user_errors

    plan_ = search.SearchPlan.read(plan.path)
    own = f"{search.PROJECT}/trial_{trial['trial_id']}"
    # Each epoch's checkpoint is uploaded as soon as it is written: a pod
    # killed mid-trial resumes from there when the trial is retried.
    step = storage.mirror(plan_.state_uri, write_back=own)
    with user_errors(), step as state:
        result = search.run_trial(dataset.path, trial, plan_.config, state, after_epoch=step.sync)
    print(f"search: trial {result.trial_id} {result.status} objective={result.objective} {result.error}")
    return result.to_json()


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_tell(plan: Input[Artifact], results: list) -> str:
    """Reports a round's results to the oracle.

    Args:
        plan: From search_setup.
        results: The round's trial results (collected from search_trial).

    Returns:
        The best objective so far.
    """
    from kftune import search, storage
    from kftune.errors import user_errors

    plan_ = search.SearchPlan.read(plan.path)
    with user_errors(), storage.mirror(plan_.state_uri) as state:
        search.tell(plan_.space, plan_.config, state, [search.TrialResult.from_json(r) for r in results])
        done = [r for r in search.results(state) if r.objective is not None]
    best = max((r.objective for r in done), default=None)
    print(f"search: {len(done)} trial(s) done, best objective so far {best}")
    return str(best)


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_result(
    dataset: Input[Dataset],
    plan: Input[Artifact],
    rounds_done: list,
    model: Output[Model],
    best_hyperparameters: Output[Artifact],
    metrics: Output[Metrics],
    trials_table: Output[Markdown],
    trials_plot: Output[HTML],
):
    """Writes the best trial's model, its hyperparameters and the trials table.

    Args:
        dataset: The training data.
        plan: From search_setup.
        rounds_done: Each round's best objective (orders this step after the rounds).
        model: Output: the search winner, the baseline the later steps improve on.
        best_hyperparameters: Output: JSON of the winning values.
        metrics: Output: best objective, trials, epochs spent.
        trials_table: Output: every trial's values, objective, epochs, time and status.
        trials_plot: Output: objective per trial.
    """
    import json

    from kftune import report, search, storage
    from kftune.errors import user_errors

    plan_ = search.SearchPlan.read(plan.path)
    with user_errors(), storage.mirror(plan_.state_uri, write_back=None) as state:
        winner = search.save_best_model(dataset.path, state, plan_.config, model.path)
        trials = search.results(state)
    with open(best_hyperparameters.path, "w") as f:
        json.dump(winner.values, f, indent=2)
    metrics.log_metric("best_val_accuracy", winner.objective)
    metrics.log_metric("trials", len(trials))
    metrics.log_metric("epochs_spent", sum(t.epochs for t in trials))
    model.metadata.update({"stage": "baseline", "hyperparameters": winner.values})
    names = sorted({k for t in trials for k in t.values})
    rows = [[t.trial_id, *[t.values.get(n, "") for n in names], t.objective if t.objective is not None else "",
             " ".join(f"{s:.3f}" for s in t.fold_scores), t.epochs, t.seconds, t.status + (f": {t.error}" if t.error else "")]
            for t in trials]
    with open(trials_table.path, "w") as f:
        f.write(f"## {plan_.config.algorithm} search: best trial {winner.trial_id} ({winner.objective:.4f})\n\n")
        f.write(report.markdown_table(["trial", *names, "objective", "fold scores", "epochs", "seconds", "status"], rows))
    fig, ax = report.pyplot().subplots(figsize=(6, 3.5))
    done = [t for t in trials if t.objective is not None]
    ax.plot([int(t.trial_id) for t in done], [t.objective for t in done], "o-", label="trial")
    best_so_far = [max(t.objective for t in done[: i + 1]) for i in range(len(done))]
    ax.step([int(t.trial_id) for t in done], best_so_far, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("val_accuracy")
    ax.legend()
    with open(trials_plot.path, "w") as f:
        f.write(report.page("Search: objective per trial", report.figure(fig)))
