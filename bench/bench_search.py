"""Search benchmark: what each algorithm hands on, scored on data that did not choose it.

For each algorithm (grid, random, Bayesian, Hyperband) and each of several
seeds, one search runs on the 81-point, four-hyperparameter space; the model it
hands on (the winning trial's weights: a trial's score is its final epoch's, so
these are the weights its objective scored) is scored on the test split. Regret
is the best configuration's mean test accuracy (over the seeds, from grid's
full table: grid trains every configuration with every seed) minus the test
accuracy of what the search handed on, in points. Printed side by side: mean
and spread (standard deviation over seeds) of regret, the training epochs each
search spent, and how far the winner's validation score overstates its test
accuracy. The efficiency target: a non-grid algorithm within 0.5 points of
grid's regret on at most a tenth of grid's epochs.

The searches are kftune's own verbs (``ask``, ``run_trial``, ``tell``) on
keras-tuner's oracles. Trials are seeded (a search with seed s trains every
trial with seed s), so a configuration trained with seed s for e epochs gives
the same result in every search: such results are cached (``--cache``), and
grid's table doubles as the reference. Hyperband's trials continue earlier
trials' weights and always train.

Data: the bundled digits (1,797 images) at 16 x 16, split 40/30/30, so that
validation and test hold 539 images each (twice the default split's).

    nice -n 10 .venv/bin/python bench/bench_search.py [--quick] [--cache FILE]
    nice -n 10 .venv/bin/python bench/bench_search.py --parallel-only
    .venv/bin/python bench/bench_search.py --worker-only      # trials in the worker's trial process, and not
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, report, search

SPACE_81 = """
learning_rate: {type: choice, values: [0.0003, 0.001, 0.003]}
batch_size: {type: choice, values: [16, 32, 64]}
dense_units: {type: choice, values: [16, 64, 128]}
dropout: {type: choice, values: [0.0, 0.25, 0.5]}
"""
# Trials of the non-grid algorithms but Hyperband, whose brackets set its own: 8 trials of 3 epochs are
# 24 epochs, a tenth of grid's 243 on the 81-point space.
BUDGET_TRIALS = 8


def _key(values: dict, seed: int, epochs: int) -> str:
    return json.dumps([search.own_values(values), seed, epochs], sort_keys=True)


def _run_key(algorithm: str, seed: int, epochs: int, trials: int) -> str:
    """The cache's key of a whole search's summary."""
    return json.dumps(["search", f"{algorithm}/{trials}", seed, epochs])


def _test_accuracy(data: Path, values: dict, config: search.SearchConfig, weights: Path) -> float:
    info = dataset.DatasetInfo.load(data)
    model = search.build_for_trial(values, info, config)
    model.load_weights(weights)
    return float(model.evaluate(dataset.batches(dataset.load_split(data, "test")), verbose=0)[1])


def run_search(data: Path, config: search.SearchConfig, cache: dict) -> dict:
    """One search, trial by trial as a worker runs it; returns its winner's test accuracy and its cost."""
    state, tests, seconds = Path(config.search_state_uri), {}, 0.0
    continued = config.search_algorithm == "hyperband"  # its trials start from their parents' weights
    while True:
        with search.oracle_turn(state) as oracle_dir:
            status, trial = search.ask(config, oracle_dir)
        if status == search.STOPPED:
            break
        if status != search.RUNNING:
            raise RuntimeError(f"{config.search_algorithm}: a single worker was told to wait")
        key = _key(trial["values"], config.seed, int(trial["values"].get("tuner/epochs", config.trial_epochs)))
        if continued or key not in cache:
            trial_dir = Path(search.trial_uri(state, trial["trial_id"]))
            parent = trial["values"].get("tuner/trial_id")
            parent_weights = Path(search.trial_uri(state, parent), search.WEIGHTS_FILE) if parent else None
            result = search.run_trial(data, trial, config, trial_dir, parent_weights=parent_weights, verbose=0)
            test = _test_accuracy(data, trial["values"], config, trial_dir / search.WEIGHTS_FILE)
            if not continued:
                cache[key] = {"result": json.loads(result.to_json()), "test": test}
        else:
            result = search.TrialResult(**{**cache[key]["result"], "trial_id": trial["trial_id"]})
            test = cache[key]["test"]
        tests[result.trial_id] = test
        seconds += result.seconds
        with search.oracle_turn(state) as oracle_dir:
            search.tell(config, oracle_dir, [result])
    with search.oracle_turn(state) as oracle_dir:
        winner, told = search.best(oracle_dir), search.results(oracle_dir)
    return {"values": winner.values, "objective": winner.objective, "test": tests[winner.trial_id],
            "trials": len(told), "epochs": sum(r.epochs for r in told), "seconds": seconds}


def compare(data: Path, space_yaml: str, seeds: list[int], epochs: int, budget_trials: int, cache: dict,
            workdir: Path, progress=print, save=lambda: None) -> str:
    size = search.SearchSpace.from_yaml(space_yaml).grid_size()
    plans = [("grid", size), ("random", budget_trials), ("bayesian", budget_trials), ("hyperband", budget_trials)]
    runs = {}
    for algorithm, trials in plans:
        for seed in seeds:
            config = search.SearchConfig(search_algorithm=algorithm, max_trials=trials, parallel_trials=1,
                                         trial_epochs=epochs, seed=seed, search_space=space_yaml,
                                         search_state_uri=str(workdir / f"{algorithm}-{seed}"))
            done = _run_key(algorithm, seed, epochs, trials)
            if done not in cache:  # a search already run (a rerun with --cache) is not replayed
                cache[done] = run_search(data, config, cache)
            runs[algorithm, seed] = cache[done]
            progress(f"  {algorithm} seed {seed}: {json.dumps(runs[algorithm, seed])}")
            save()
    # The reference: each configuration's mean test accuracy over the seeds, from grid's full table.
    by_config: dict[str, list[float]] = {}
    for key, entry in cache.items():
        if json.loads(key)[0] == "search":
            continue
        values, seed, trained = json.loads(key)
        if seed in seeds and trained == epochs:
            by_config.setdefault(json.dumps(values, sort_keys=True), []).append(entry["test"])
    means = {c: statistics.mean(t) for c, t in by_config.items() if len(t) == len(seeds)}
    if len(means) != size:
        raise RuntimeError(f"grid's table holds {len(means)} of the {size} configurations with every seed")
    best_config, best_mean = max(means.items(), key=lambda item: item[1])
    rows, regrets = [], {}
    grid_epochs = statistics.mean(runs["grid", s]["epochs"] for s in seeds)
    for algorithm, _ in plans:
        mine = [runs[algorithm, s] for s in seeds]
        regret = [(best_mean - r["test"]) * 100 for r in mine]
        regrets[algorithm] = statistics.mean(regret)
        spent = statistics.mean(r["epochs"] for r in mine)
        rows.append([algorithm, f"{statistics.mean(r['trials'] for r in mine):.1f}", f"{spent:.1f}",
                     f"{spent / grid_epochs:.3f}", f"{statistics.mean(r['test'] for r in mine):.4f}",
                     f"{statistics.mean(regret):.2f} ± {statistics.stdev(regret) if len(regret) > 1 else 0:.2f}",
                     f"{statistics.mean((r['objective'] - r['test']) * 100 for r in mine):+.2f}",
                     f"{statistics.mean(r['seconds'] for r in mine):.0f}"])
    target = [a for a in ("random", "bayesian", "hyperband")
              if regrets[a] <= regrets["grid"] + 0.5
              and statistics.mean(runs[a, s]["epochs"] for s in seeds) <= grid_epochs / 10]
    head = (f"Best configuration {best_config}: mean test accuracy {best_mean:.4f} over seeds {seeds}; "
            f"{epochs} epochs per trial.\n\n")
    foot = (f"\n\nEfficiency target (a non-grid algorithm within 0.5 points of grid's regret on at most a tenth "
            f"of grid's epochs): {'met by ' + ', '.join(target) if target else 'not met'}.")
    return head + report.markdown_table(
        ["algorithm", "trials", "epochs", "epochs / grid's", "test accuracy", "regret (points, mean ± sd)",
         "val overstates test by (points)", "training s"], rows) + foot


# The tutorial's recipe: GridSearchCV(cv=3) over its MLP, learning rate x batch size, 10 epochs.
TUTORIAL_SPACE = "{learning_rate: {type: choice, values: [0.001, 0.01, 0.1]}, batch_size: {type: choice, values: [16, 32, 64]}}"
TUTORIAL_EPOCHS, TUTORIAL_FOLDS = 10, 3


def tutorial_mlp(input_shape, num_classes, **_):
    """The tutorial's MLP (Dense(64, relu), then the classifier), for kftune: ``model="bench_search:tutorial_mlp"``."""
    from kftune.models import keras

    k = keras()
    inputs = k.Input(shape=input_shape)
    x = k.layers.Flatten()(k.layers.Rescaling(1.0 / 255.0)(inputs))
    x = k.layers.Dense(64, activation="relu")(x)
    return k.Model(inputs, k.layers.Dense(num_classes, activation="softmax")(x))


def _arrays(data: Path, split: str):
    import numpy as np

    images, labels = zip(*dataset.load_split(data, split).as_numpy_iterator(), strict=True)
    return np.stack(images).reshape(len(images), -1).astype("float32") / 255.0, np.array(labels)


def tutorial_recipe(data: Path, workdir: Path) -> str:
    """The tutorial's GridSearchCV over a scikeras KerasClassifier, beside kftune's grid with folds=3."""
    import keras  # Keras 3, as scikeras needs: the tutorial's own stack
    from scikeras.wrappers import KerasClassifier
    from sklearn.model_selection import GridSearchCV

    def create_model(learning_rate, meta):
        model = keras.Sequential([keras.Input((meta["n_features_in_"],)),
                                  keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(meta["n_classes_"], activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    space = search.SearchSpace.from_yaml(TUTORIAL_SPACE)
    grid = {p.name: list(p.values) for p in space.params}
    (x_train, y_train), (x_test, y_test) = _arrays(data, "train"), _arrays(data, "test")
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    cv = GridSearchCV(KerasClassifier(create_model, learning_rate=0.01, epochs=TUTORIAL_EPOCHS, verbose=0),
                      {"model__learning_rate": grid["learning_rate"], "batch_size": grid["batch_size"]},
                      cv=TUTORIAL_FOLDS, n_jobs=1).fit(x_train, y_train)
    sk_seconds = time.perf_counter() - started
    sk_best = {"learning_rate": cv.best_params_["model__learning_rate"], "batch_size": cv.best_params_["batch_size"]}
    sk_test = float(cv.score(x_test, y_test))
    size = space.grid_size()
    sk_epochs = size * TUTORIAL_FOLDS * TUTORIAL_EPOCHS + TUTORIAL_EPOCHS

    config = search.SearchConfig(search_algorithm="grid", max_trials=size, parallel_trials=1,
                                 trial_epochs=TUTORIAL_EPOCHS, folds=TUTORIAL_FOLDS, model="bench_search:tutorial_mlp",
                                 search_space=TUTORIAL_SPACE, search_state_uri=str(workdir / "tutorial"))
    started = time.perf_counter()
    search.search(data, config, progress=lambda _: None)
    winner, trials = search.save_best_model(data, config, workdir / "tutorial-best")
    kf_seconds = time.perf_counter() - started
    kf_test = _test_accuracy_of_saved(data, workdir / "tutorial-best")
    kf_epochs = sum(t.epochs for t in trials) + TUTORIAL_EPOCHS
    rows = [["GridSearchCV(cv=3) + scikeras KerasClassifier (Keras 3)", json.dumps(sk_best), f"{cv.best_score_:.4f}",
             f"{sk_test:.4f}", sk_epochs, f"{sk_seconds:.0f}"],
            ["kftune grid, folds=3 (tf-keras)", json.dumps(winner.values), f"{winner.objective:.4f}", f"{kf_test:.4f}",
             kf_epochs, f"{kf_seconds:.0f}"]]
    return (f"### The tutorial's recipe: its MLP, {json.dumps(grid)}, {TUTORIAL_EPOCHS} epochs, cv={TUTORIAL_FOLDS}\n\n"
            + report.markdown_table(["search", "best configuration", "best CV score", "test accuracy of the refit "
                                     "winner", "epochs", "wall s"], rows))


def _test_accuracy_of_saved(data: Path, folder: Path) -> float:
    from kftune import models

    model, meta = models.load(folder)
    models.compile_model(model, len(meta.class_names))
    return float(model.evaluate(dataset.batches(dataset.load_split(data, "test")), verbose=0)[1])


def parallel_wall_times(trials: int, epochs: int) -> str:
    """Runs the pipeline's search workers (one process each, as pods) with 1 and 3 workers at once."""
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "data")
        dataset.ingest(dataset.IngestConfig(image_size=16), data, progress=lambda _: None)
        for workers in (1, 3):
            config = search.SearchConfig(search_algorithm="random", max_trials=trials, parallel_trials=workers,
                                         trial_epochs=epochs, seed=1, search_state_uri=str(Path(tmp, f"state{workers}")))
            code = (f"from kftune import search; import json, sys; search.work({str(data)!r}, "
                    f"search.SearchConfig(**json.loads(sys.argv[1])), int(sys.argv[2]), progress=lambda _: None)")
            started = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(config.__dict__), str(i)])
                     for i in range(workers)]
            assert all(p.wait() == 0 for p in procs)
            rows.append([workers, trials, f"{time.perf_counter() - started:.0f}"])
    base = float(rows[0][2])
    for row in rows:
        row.append(f"{base / float(row[2]):.2f}x")
    return "### Parallel search workers (processes standing for pods)\n\n" + report.markdown_table(
        ["workers", "trials", "wall s", "speed-up"], rows)


def worker_overhead(data: Path, workdir: Path) -> str:
    """The tutorial's grid (folds=3) through one pipeline worker: trials in its trial process, and in its own."""
    rows = []
    for in_child, title in ((True, "in the worker's trial process (the pipeline's way)"),
                            (False, "in the worker's own process")):
        config = search.SearchConfig(search_algorithm="grid", max_trials=9, parallel_trials=1,
                                     trial_epochs=TUTORIAL_EPOCHS, folds=TUTORIAL_FOLDS,
                                     model="bench_search:tutorial_mlp", search_space=TUTORIAL_SPACE,
                                     search_state_uri=str(workdir / f"worker-{in_child}"))
        started = time.perf_counter()
        ran = search.work(data, config, in_child=in_child, progress=lambda _: None)
        wall = time.perf_counter() - started
        rows.append([title, len(ran), f"{sum(r.seconds for r in ran):.1f}", f"{wall:.1f}"])
    rows.append(["trial process: wall / own process", "", "", f"{float(rows[0][3]) / float(rows[1][3]):.2f}x"])
    return "### One worker's trials\n\n" + report.markdown_table(
        ["trials run", "trials", "seconds in trials", "wall s"], rows)


def _digits(folder: Path) -> Path:
    """The bundled digits at 16 x 16, split 40/30/30: 719 training, 539 validation and 539 test images."""
    dataset.ingest(dataset.IngestConfig(image_size=16, validation_fraction=0.3, test_fraction=0.3), folder,
                   progress=lambda _: None)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the tutorial's 3 x 3 space, 2 seeds, 2 epochs: checks the script runs (1-2 min)")
    parser.add_argument("--cache", type=Path, help="a JSON file of trained (configuration, seed, epochs) "
                        "results, read and written, so that a rerun trains only what is new")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="the seeds of each algorithm's searches (default 0,1,2,3,4)")
    parser.add_argument("--parallel-only", action="store_true", help="only the parallel trial tasks measurement")
    parser.add_argument("--worker-only", action="store_true",
                        help="only the tutorial's grid through one search worker, trials in its trial process and not")
    parser.add_argument("--tutorial-only", action="store_true",
                        help="only the tutorial's recipe (GridSearchCV over scikeras, which it needs) beside kftune's")
    args = parser.parse_args()
    if args.parallel_only:
        print(parallel_wall_times(trials=6, epochs=5))
        return 0
    if args.tutorial_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(tutorial_recipe(_digits(Path(tmp, "digits")), Path(tmp)))
        return 0
    if args.worker_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(worker_overhead(_digits(Path(tmp, "digits")), Path(tmp)))
        return 0
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    if args.quick:
        space, seeds, epochs, budget = search.CLASSIC_SPACE_YAML, [0, 1], 2, 3
    else:
        space, seeds, epochs, budget = SPACE_81, [int(seed) for seed in args.seeds.split(",")], 3, BUDGET_TRIALS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = _digits(Path(tmp, "digits"))
        def save():
            if args.cache:
                args.cache.write_text(json.dumps(cache))

        table = compare(data, space, seeds, epochs, budget, cache, Path(tmp), progress=print, save=save)
    print(f"\n### Regret of the model each search hands on ({time.perf_counter() - started:.0f} s)\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
