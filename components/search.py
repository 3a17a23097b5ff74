"""Search components: parallel workers sharing one oracle (keras-tuner's or Optuna's), then the winner.

The pipeline runs ``search_worker`` once per index in ``parallel_trials``
(one ParallelFor, each worker a pod with a GPU on a cluster); each worker asks
the oracle for a trial, trains it in its trial process, tells the result, and
goes on until ``max_trials`` are done, so no GPU waits for a round's slowest
trial. ``search_result`` then writes the winner. The oracle's state lives at
``search_state_uri``: a rerun (or a retried worker) resumes from it.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_worker(dataset: Input[Dataset], search_config: Input[Artifact], worker: str) -> str:
    """Trains trials the oracle hands out until the search is done.

    Args:
        dataset: The training data.
        search_config: The search settings (from the validation step).
        worker: This worker's index (the loop item, a string as in the backend suite's loops); a rerun
            worker with the same index resumes its unfinished trial.

    Returns:
        How many trials this worker ran.
    """
    from kftune import parameters, search
    from kftune.errors import user_errors

    with user_errors(), open(search_config.path) as f:
        config = parameters.load(search.SearchConfig, f.read())
    with user_errors():
        ran = search.work(dataset.path, config, int(worker))
    print(f"search: worker {worker} ran {len(ran)} trial(s)")
    return str(len(ran))


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def search_result(
    dataset: Input[Dataset],
    search_config: Input[Artifact],
    workers_done: list,
    model: Output[Model],
    best_hyperparameters: Output[Artifact],
    metrics: Output[Metrics],
    trials_table: Output[Markdown],
    trials_plot: Output[HTML],
):
    """Writes the best trial's model, its hyperparameters and the trials table.

    Args:
        dataset: The training data.
        search_config: The search settings (from the validation step).
        workers_done: Each worker's trial count (orders this step after the workers).
        model: Output: the search winner, the baseline the later steps improve on.
        best_hyperparameters: Output: JSON of the winning values.
        metrics: Output: best objective, trials, epochs spent.
        trials_table: Output: every trial's values, objective, epochs, time and status.
        trials_plot: Output: each trial's learning curve and where early stopping stopped it, objective
            per trial, and Optuna's parameter importance when the algorithm is Optuna's.
    """
    import json

    from kftune import parameters, search
    from kftune.errors import user_errors

    with open(search_config.path) as f:
        config = parameters.load(search.SearchConfig, f.read())
    with user_errors():
        winner, trials = search.save_best_model(dataset.path, config, model.path)
        importances = search.importance(config, config.search_state_uri)
    with open(best_hyperparameters.path, "w") as f:
        json.dump(winner.values, f, indent=2)
    metrics.log_metric("best_val_accuracy", winner.objective)
    metrics.log_metric("trials", len(trials))
    metrics.log_metric("epochs_spent", sum(t.epochs for t in trials))
    metrics.log_metric("trials_stopped_early", sum(t.status == "STOPPED" for t in trials))
    model.metadata.update({"stage": "baseline", "hyperparameters": winner.values})
    with open(trials_table.path, "w") as f:
        f.write(search.trials_markdown(config, winner, trials, importances))
    with open(trials_plot.path, "w") as f:
        f.write(search.trials_page(config, trials, importances))
    print(f"search: best trial {winner.trial_id} of {len(trials)}: {winner.describe()} "
          f"(workers ran {', '.join(workers_done)})")
