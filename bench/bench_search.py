"""Search benchmark: grid against random, Bayesian and Hyperband on the same space and data.

Prints, side by side, the best validation accuracy, the training epochs spent
and the wall time of each algorithm, on the tutorial's 3 x 3 space and on a
four-hyperparameter space whose grid has 81 points; then the wall time of the
search steps under KFP's local runner with 1 and with 3 parallel trial tasks.

    .venv/bin/python bench/bench_search.py [--quick]
"""

import argparse
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


def run(data: Path, space_yaml: str, algorithm: str, max_trials: int, epochs: int, workdir: Path) -> list:
    config = search.SearchConfig(search_algorithm=algorithm, max_trials=max_trials, trial_epochs=epochs, seed=1)
    started = time.perf_counter()
    best = search.search(data, search.SearchSpace.from_yaml(space_yaml), config, workdir / algorithm,
                         progress=lambda _: None)
    seconds = time.perf_counter() - started
    results = search.results(workdir / algorithm)
    return [algorithm, len(results), sum(r.epochs for r in results), best.objective, seconds]


def compare(data: Path, title: str, space_yaml: str, budget_trials: int, epochs: int) -> str:
    grid_size = search.SearchSpace.from_yaml(space_yaml).grid_size()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(data, space_yaml, "grid", grid_size, epochs, Path(tmp))]
        for algorithm in ("random", "bayesian", "hyperband"):
            rows.append(run(data, space_yaml, algorithm, budget_trials, epochs, Path(tmp)))
    grid_best, grid_epochs = rows[0][3], rows[0][2]
    table = [[name, trials, spent, f"{spent / grid_epochs:.2f}", f"{best:.4f}", f"{(best - grid_best) * 100:+.2f}",
              f"{seconds:.0f}"] for name, trials, spent, best, seconds in rows]
    return f"### {title}\n\n" + report.markdown_table(
        ["algorithm", "trials", "epochs", "epochs / grid's", "best val accuracy", "vs grid (points)", "wall s"], table)


def parallel_wall_times(trials: int, epochs: int) -> str:
    """Runs the pipeline's search steps under kfp.local with 1 and 3 trial tasks per round."""
    import warnings

    from kfp import dsl, local

    from pipelines.search_steps import search_steps

    warnings.filterwarnings("ignore")

    @dsl.pipeline(name="kftune-search-bench")
    def search_only(data_dir: str, per_round: int, rounds: int):
        imported = dsl.importer(artifact_uri=data_dir, artifact_class=dsl.Dataset, reimport=True)
        search_steps(imported.output, space=search.CLASSIC_SPACE_YAML, algorithm="random", max_trials=trials,
                     epochs=epochs, folds=1, seed=1, model="small_cnn", rounds=rounds, trials_per_round=per_round,
                     state_uri="")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "data")
        dataset.ingest(dataset.IngestConfig(image_size=16), data, progress=lambda _: None)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(tmp, "root")))
        for per_round in (1, 3):
            started = time.perf_counter()
            search_only(data_dir=str(data), per_round=per_round, rounds=-(-trials // per_round))
            rows.append([per_round, trials, f"{time.perf_counter() - started:.0f}"])
    base = float(rows[0][2])
    for row in rows:
        row.append(f"{base / float(row[2]):.2f}x")
    return "### Parallel trial tasks under the local runner\n\n" + report.markdown_table(
        ["trial tasks per round", "trials", "wall s", "speed-up"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and trials, to check the script runs")
    parser.add_argument("--parallel-only", action="store_true", help="only the parallel trial tasks measurement")
    args = parser.parse_args()
    epochs = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        if args.parallel_only:
            print(parallel_wall_times(trials=6, epochs=epochs))
            return 0
        data = Path(tmp, "digits")
        dataset.ingest(dataset.IngestConfig(image_size=16), data, progress=lambda _: None)
        print(compare(data, "The tutorial's 3 x 3 space (learning rate x batch size)", search.CLASSIC_SPACE_YAML,
                      budget_trials=3, epochs=epochs), flush=True)
        print(compare(data, "Four hyperparameters, 81-point grid", SPACE_81, budget_trials=8, epochs=epochs), flush=True)
    print(parallel_wall_times(trials=6, epochs=epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
