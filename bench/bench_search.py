"""Search benchmark: what each algorithm hands on, scored on data that did not choose it.

For each algorithm (keras-tuner's grid, random, Bayesian and Hyperband; Optuna's
TPE and asynchronous successive halving) and each of ten seeds, one search runs
on the 81-point, four-hyperparameter space; the model it hands on (the winning
trial's weights: a trial's score is its final epoch's, or the epoch where it
was stopped, so these are the weights its objective scored) is scored on the
test split. Regret is the best configuration's mean test accuracy (over the
seeds, from grid's full table: grid trains every configuration with every seed)
minus the test accuracy of what the search handed on, in points. Printed side
by side: regret's mean with its 95% confidence interval (Student's t over the
seeds), the training epochs each search spent, the distinct configurations it
tried, the epochs its winner trained, and how far the winner's validation
score overstates its test accuracy. The goal: tpe and asha each within 0.5
points of grid's regret on at most a twentieth of grid's epochs (exit 1 when
missed). Every non-grid algorithm gets the same budget, about 12 epochs (a
twentieth of grid's 243): random, Bayesian and TPE 4 trials of 3 epochs;
asha 6 trials (``--asha-trials``), most stopped after their first epoch;
Hyperband's one iteration at factor 3 sets its own (about 11).

The searches are kftune's own verbs (``ask``, ``run_trial``, ``tell``,
``report_epoch``). Trials are seeded (a search with seed s trains every trial
with seed s), so a configuration trained with seed s for e epochs gives the same
result in every search: such results are cached (``--cache``), and grid's table
doubles as the reference. Hyperband's trials continue earlier trials' weights,
and asha's may stop early: theirs always train.

Data: the bundled digits (1,797 images) at 16 x 16, split 40/30/30, so that
validation and test hold 539 images each (one test image: 0.19 points).

    nice -n 10 .venv/bin/python bench/bench_search.py [--quick] [--cache FILE] [--seeds 0,1,...]
    .venv/bin/python bench/bench_search.py --cache ALL.json --merge A.json B.json   # caches run apart, one table
    nice -n 10 .venv/bin/python bench/bench_search.py --parallel-only
    .venv/bin/python bench/bench_search.py --worker-only      # trials in the worker's trial process, and not
    .venv/bin/python bench/bench_search.py --tutorial-only    # timed: GridSearchCV beside kftune's grid, 1 and 2 workers
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timing

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, report, search

SPACE_81 = """
learning_rate: {type: choice, values: [0.0003, 0.001, 0.003]}
batch_size: {type: choice, values: [16, 32, 64]}
dense_units: {type: choice, values: [16, 64, 128]}
dropout: {type: choice, values: [0.0, 0.25, 0.5]}
"""
# Trials of the non-grid algorithms, about a twentieth of grid's 243 epochs on the 81-point space: 4 trials of
# 3 epochs are 12; asha's trials mostly stop after epoch 1 (6 + 2 x the ones it promotes: 8 trials spent 15.6
# and 18.4 epochs on average over seeds 0-4 and 5-9, more than a twentieth); Hyperband's brackets set its own
# (about 11).
BUDGET_TRIALS = 4
ASHA_TRIALS = 6
GOAL_POINTS, GOAL_SHARE = 0.5, 1 / 20


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


def run_search(data: Path, config: search.SearchConfig, cache: dict, save=lambda: None) -> dict:
    """One search, trial by trial as a worker runs it; returns its winner's test accuracy and its cost."""
    state, tests, seconds = Path(config.search_state_uri), {}, 0.0
    # Hyperband's trials start from their parents' weights; asha's stop where the pruner says: both always train.
    continued = config.search_algorithm == "hyperband" or config.stops_early
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


            def report(epoch: int, score: float, trial_id=trial["trial_id"]) -> bool:
                with search.oracle_turn(state) as oracle_dir:
                    return search.report_epoch(config, oracle_dir, trial_id, epoch, score)

            result = search.run_trial(data, trial, config, trial_dir, parent_weights=parent_weights, verbose=0,
                                      report=report if config.stops_early else None)
            test = _test_accuracy(data, trial["values"], config, trial_dir / search.WEIGHTS_FILE)
            if not continued:
                cache[key] = {"result": json.loads(result.to_json()), "test": test}
                save()
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
            "trials": len(told), "epochs": sum(r.epochs for r in told), "seconds": seconds,
            "configurations": len({json.dumps(search.own_values(r.values), sort_keys=True) for r in told}),
            "winner_epochs": winner.curve[-1][0] if winner.curve else winner.epochs,
            "stopped": sum(r.status == "STOPPED" for r in told)}


def _interval(values: list[float]) -> str:
    """Mean and the half-width of its 95% confidence interval (Student's t over the seeds)."""
    from scipy import stats

    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:.2f} ± {half:.2f}"


def compare(data: Path, space_yaml: str, seeds: list[int], epochs: int, budget_trials: int, asha_trials: int,
            cache: dict, workdir: Path, progress=print, save=lambda: None) -> tuple[str, bool]:
    size = search.SearchSpace.from_yaml(space_yaml).grid_size()
    plans = [("grid", size), ("random", budget_trials), ("bayesian", budget_trials), ("tpe", budget_trials),
             ("hyperband", budget_trials), ("asha", asha_trials)]
    runs = {}
    for algorithm, trials in plans:
        for seed in seeds:
            config = search.SearchConfig(search_algorithm=algorithm, max_trials=trials, parallel_trials=1,
                                         trial_epochs=epochs, seed=seed, search_space=space_yaml,
                                         search_state_uri=str(workdir / f"{algorithm}-{seed}"))
            done = _run_key(algorithm, seed, epochs, trials)
            if done not in cache:  # a search already run (a rerun with --cache) is not replayed
                cache[done] = run_search(data, config, cache, save)
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
    spent = {}
    for algorithm, _ in plans:
        mine = [runs[algorithm, s] for s in seeds]
        regret = [(best_mean - r["test"]) * 100 for r in mine]
        regrets[algorithm] = statistics.mean(regret)
        spent[algorithm] = statistics.mean(r["epochs"] for r in mine)
        rows.append([algorithm, f"{statistics.mean(r['trials'] for r in mine):.1f}",
                     f"{statistics.mean(r.get('configurations', r['trials']) for r in mine):.1f}",
                     f"{statistics.mean(r.get('stopped', 0) for r in mine):.1f}",
                     f"{spent[algorithm]:.1f}", f"{spent[algorithm] / grid_epochs:.3f}",
                     f"{statistics.mean(r.get('winner_epochs', epochs) for r in mine):.1f}",
                     f"{statistics.mean(r['test'] for r in mine):.4f}", _interval(regret),
                     f"{statistics.mean((r['objective'] - r['test']) * 100 for r in mine):+.2f}",
                     f"{statistics.mean(r['seconds'] for r in mine):.0f}"])
    goal = {a: (regrets[a] <= regrets["grid"] + GOAL_POINTS, spent[a] <= grid_epochs * GOAL_SHARE)
            for a in ("tpe", "asha")}
    met = all(all(v) for v in goal.values())
    head = (f"Best configuration {best_config}: mean test accuracy {best_mean:.4f} over {len(seeds)} seeds "
            f"{seeds}; {epochs} epochs per trial; one test image is {100 / _test_images(data):.2f} points.\n\n")
    foot = "\n\nGoal (tpe and asha each within 0.5 points of grid's regret on at most 1/20 of grid's epochs): " + (
        "; ".join(f"{a}: regret {regrets[a] - regrets['grid']:+.2f} points from grid's "
                  f"({'within' if ok_regret else 'not within'} 0.5), {spent[a] / grid_epochs:.3f} of grid's epochs "
                  f"({'at most' if ok_epochs else 'more than'} 1/20)" for a, (ok_regret, ok_epochs) in goal.items())
        + (": met." if met else ": not met."))
    return head + report.markdown_table(
        ["algorithm", "trials", "configurations", "stopped early", "epochs", "epochs / grid's", "winner's epochs",
         "test accuracy", "regret (points, mean ± 95% CI)", "val overstates test by (points)", "training s"],
        rows) + foot, met


def _test_images(data: Path) -> int:
    return dataset.DatasetInfo.load(data).splits["test"]


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


def tutorial_recipe(data: Path, workdir: Path, repeats: int = 5) -> str:
    """The tutorial's GridSearchCV over a scikeras KerasClassifier, beside kftune's grid with folds=3 run by one
    worker and by two (parallel_trials=2): interleaved rounds, median [min-max] of the wall seconds."""
    import itertools
    import os
    import subprocess

    import keras  # Keras 3, as scikeras needs: the tutorial's own stack
    import tensorflow as tf
    import timing
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
    size = space.grid_size()
    outcome, runs = {}, itertools.count()

    def gridsearchcv() -> float:
        keras.utils.set_random_seed(0)
        started = time.perf_counter()
        cv = GridSearchCV(KerasClassifier(create_model, learning_rate=0.01, epochs=TUTORIAL_EPOCHS, verbose=0),
                          {"model__learning_rate": grid["learning_rate"], "batch_size": grid["batch_size"]},
                          cv=TUTORIAL_FOLDS, n_jobs=1).fit(x_train, y_train)
        seconds = time.perf_counter() - started
        best = {"learning_rate": cv.best_params_["model__learning_rate"], "batch_size": cv.best_params_["batch_size"]}
        outcome["GridSearchCV"] = (best, cv.best_score_, float(cv.score(x_test, y_test)))
        return seconds

    def kftune_grid(workers: int):
        def run() -> float:
            config = search.SearchConfig(
                search_algorithm="grid", max_trials=size, parallel_trials=workers, trial_epochs=TUTORIAL_EPOCHS,
                folds=TUTORIAL_FOLDS, model="bench_search:tutorial_mlp", search_space=TUTORIAL_SPACE,
                search_state_uri=str(workdir / f"tutorial-{workers}-{next(runs)}"))
            code = ("from kftune import search; import json, sys; search.work(sys.argv[1], search.SearchConfig("
                    "**json.loads(sys.argv[2])), int(sys.argv[3]), in_child=False, progress=lambda _: None)")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                 os.environ.get("PYTHONPATH", "")])}
            started = time.perf_counter()
            # Worker 0 in this process (as search.search runs it), the others as processes standing for pods.
            others = [subprocess.Popen([sys.executable, "-c", code, str(data), json.dumps(config.__dict__), str(i)],
                                       env=env) for i in range(1, workers)]
            search.work(data, config, 0, in_child=False, progress=lambda _: None)
            if not all(p.wait() == 0 for p in others):
                raise RuntimeError("a search worker failed")
            tf.keras.backend.clear_session()
            best = workdir / f"best-{Path(config.search_state_uri).name}"
            winner, trials = search.save_best_model(data, config, best)
            seconds = time.perf_counter() - started
            outcome[f"kftune {workers}"] = (winner.values, winner.objective, _test_accuracy_of_saved(data, best),
                                            sum(t.epochs for t in trials) + TUTORIAL_EPOCHS)
            return seconds
        return run

    names = {"GridSearchCV": "GridSearchCV(cv=3) + scikeras KerasClassifier (Keras 3)",
             "kftune 1": "kftune grid, folds=3 (tf-keras), parallel_trials=1",
             "kftune 2": "kftune grid, folds=3, parallel_trials=2 (a second worker process)"}
    seconds = timing.interleaved({"GridSearchCV": gridsearchcv, "kftune 1": kftune_grid(1),
                                  "kftune 2": kftune_grid(2)}, repeats, fmt="{:,.1f}")
    sk_epochs = size * TUTORIAL_FOLDS * TUTORIAL_EPOCHS + TUTORIAL_EPOCHS
    rows = []
    for key, label in names.items():
        values, score, test = outcome[key][:3]
        epochs = outcome[key][3] if key != "GridSearchCV" else sk_epochs
        ratio = timing.spread(timing.ratios(seconds[key], seconds["GridSearchCV"]), "{:.2f}x")
        rows.append([label, json.dumps(values), f"{score:.4f}", f"{test:.4f}", epochs,
                     timing.spread(seconds[key], "{:.1f}"), ratio])
    return (f"### The tutorial's recipe: its MLP, {json.dumps(grid)}, {TUTORIAL_EPOCHS} epochs, cv={TUTORIAL_FOLDS}\n\n"
            f"Wall seconds: median [min-max] of {len(seconds['GridSearchCV'])} interleaved rounds after a warm-up "
            f"round; {timing.threads()}.\n\n"
            + report.markdown_table(["search", "best configuration", "best CV score", "test accuracy of the refit "
                                     "winner", "epochs", "wall s", "wall / GridSearchCV's"], rows))


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
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9",
                        help="the seeds of each algorithm's searches (default 0 to 9)")
    parser.add_argument("--asha-trials", type=int, default=ASHA_TRIALS,
                        help=f"asha's max_trials (default {ASHA_TRIALS}: about a twentieth of grid's epochs)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="caches of runs over other seeds (run apart, to use more processes), read into --cache")
    parser.add_argument("--parallel-only", action="store_true", help="only the parallel trial tasks measurement")
    parser.add_argument("--worker-only", action="store_true",
                        help="only the tutorial's grid through one search worker, trials in its trial process and not")
    parser.add_argument("--tutorial-only", action="store_true",
                        help="only the tutorial's recipe (GridSearchCV over scikeras, which it needs) beside kftune's")
    parser.add_argument("--repeats", type=int, default=timing.MIN_REPEATS,
                        help="timed rounds of --tutorial-only after its warm-up round (default 5)")
    args = parser.parse_args()
    if args.parallel_only:
        print(parallel_wall_times(trials=6, epochs=5))
        return 0
    if args.tutorial_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(tutorial_recipe(_digits(Path(tmp, "digits")), Path(tmp), args.repeats))
        return 0
    if args.worker_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(worker_overhead(_digits(Path(tmp, "digits")), Path(tmp)))
        return 0
    cache = json.loads(args.cache.read_text()) if args.cache and args.cache.exists() else {}
    for other in args.merge:
        cache.update(json.loads(other.read_text()))
    if args.quick:
        space, seeds, epochs, budget, asha = search.CLASSIC_SPACE_YAML, [0, 1], 2, 3, 4
    else:
        space, seeds, epochs, budget, asha = (SPACE_81, [int(seed) for seed in args.seeds.split(",")], 3,
                                              BUDGET_TRIALS, args.asha_trials)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = _digits(Path(tmp, "digits"))
        def save():
            if args.cache:
                args.cache.write_text(json.dumps(cache))

        save()
        table, met = compare(data, space, seeds, epochs, budget, asha, cache, Path(tmp), progress=print, save=save)
    print(f"\n### Regret of the model each search hands on ({time.perf_counter() - started:.0f} s)\n\n{table}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
