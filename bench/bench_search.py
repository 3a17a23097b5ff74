"""Search benchmark: grid against random, Bayesian and Hyperband on the same space and data.

Prints, side by side, the best validation accuracy, the training epochs spent
and the wall time of each algorithm, on the tutorial's 3 x 3 space and on a
four-hyperparameter space whose grid has 81 points; then the wall time of the
search workers with 1 and with 3 running at once (each its own process, as each is its own pod).

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
    config = search.SearchConfig(search_algorithm=algorithm, max_trials=max_trials, parallel_trials=1,
                                 trial_epochs=epochs, seed=1, search_space=space_yaml,
                                 search_state_uri=str(workdir / algorithm))
    started = time.perf_counter()
    best = search.search(data, config, progress=lambda _: None)
    seconds = time.perf_counter() - started
    results = search.results(workdir / algorithm / search.ORACLE_DIR)
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
    """Runs the pipeline's search workers (one process each, as pods) with 1 and 3 workers at once."""
    import json
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
