"""The pipeline: compiled YAML is current, bad arguments stop early, and the whole thing runs locally."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kftune import search
from pipelines import cli

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_yaml_is_current(tmp_path):
    fresh = cli.compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == cli.COMPILED.read_text(), "pipelines/compiled is stale: run `make compile`"


def test_every_step_is_a_kftune_component_with_no_install_at_start_up():
    spec = next(yaml.safe_load_all(cli.COMPILED.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) >= 10
    for name, executor in executors.items():
        container = executor["container"]
        # Which step gets which of the two images: tests/test_cluster.py.
        assert container["image"].endswith(("/kftune:0.1.0", "/kftune-cpu:0.1.0")), name
        script = " ".join(container["command"] + container.get("args", []))
        assert "pip install" not in script, f"{name} installs packages at start-up"


@pytest.mark.parametrize("arguments, message", [
    (["source=/no/such/folder"], "`source` `/no/such/folder` does not exist"),
    (["source=s3://bucket/flowers"], "`source` uses s3://"),
    (["export_destination=s3://bucket/models"], "`export_destination` uses s3://"),
    (["max_trials=8", "parallel_trials=9"], "`parallel_trials`=9 is more than `max_trials`=8"),
    (["search_algorithm=grid", "max_trials=12"], "more than the 9 points of the grid"),
    (["finetune_learning_rate=nan"], "`finetune_learning_rate` must be a finite number"),
    (["seed=-1"], "`seed` must be a whole number >= 0"),
    (["augment_copies=100000"], "`augment_copies` must be at most"),
    (["validation_fraction=0.7", "test_fraction=0.3"], "at least 10% for training"),
    (["max_trails=3"], "unknown pipeline parameter `max_trails`"),
    (["max_trials=three"], "`max_trials` must be integer"),
    (["target_sparsity=1.0"], "target_sparsity"),
    (["search_space={lr: {type: float, min: 1, max: 0}}"], "search space `lr`"),
    (["augment_spec={rotation: 40}"], "unknown augment key"),
    (["parallel_trials=0"], "`parallel_trials` must be a whole number >= 1"),
])
def test_bad_arguments_stop_before_any_work_with_one_line(arguments, message, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run-local", *arguments, "--pipeline-root", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert process.returncode == 2
    lines = [line for line in process.stderr.splitlines() if line.startswith("kftune:")]
    assert len(lines) == 1 and message in lines[0], process.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.e2e
def test_the_whole_pipeline_runs_locally_and_exports(local_run):
    run_dir, table, destination = local_run
    # Every stage ran, and the table has numbers for each candidate.
    for stage in ("ingest", "augment", "search", "fine-tune", "prune", "export"):
        row = next(line for line in table.splitlines() if line.startswith(stage))
        assert "skipped" not in row, table
    assert "(exported)" in table
    assert "+ int8 TFLite" in table, table  # the quantized candidate was made and measured
    # Two search workers shared the oracle and ran exactly max_trials trials between them.
    search_config = json.loads(next(run_dir.glob("validate/search_config")).read_text())
    assert len(search.told(search_config["search_state_uri"])) == 3
    worker_counts = [int(json.loads(p.read_text())["parameterValues"]["Output"])
                     for p in run_dir.glob("for-loop-*/search-worker/executor_output.json")]
    assert len(worker_counts) == 2 and sum(worker_counts) == 3, worker_counts
    # The Kubeflow UI's artifacts are there: confusion matrices labelled with class names, HTML reports.
    executor_output = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    confusion = executor_output["artifacts"]["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [c["displayName"] for c in confusion["annotationSpecs"]] == [str(i) for i in range(10)]
    for report in ("augment/preview", "search-result/trials_plot", "finetune/curves", "prune/report_html",
                   "evaluate/report_html"):
        assert (run_dir / report).read_text().startswith("<!doctype html>"), report
    # The export is complete and loadable by serving.
    version = destination / "1"
    metadata = json.loads((version / "metadata.json").read_text())
    assert metadata["data_fingerprint"] and metadata["candidate"] in ("baseline", "finetuned", "pruned", "quantized")
    assert (version / "saved_model.pb").exists() and (version / "MANIFEST.json").exists()


@pytest.mark.e2e
def test_the_console_is_one_line_per_task_and_each_task_log_is_a_file(local_run, local_run_console):
    run_dir, _, _ = local_run
    lines = local_run_console.splitlines()
    assert len(lines) < 60, local_run_console
    assert not any(noise in local_run_console for noise in ("executor_input", "I0000", "E0000", "cuInit", "TensorSpec"))
    assert "  start  search-worker[0]" in lines and "  start  search-worker[1]" in lines
    trials = [line for line in lines if " trial " in line and "val_accuracy" in line]
    assert len(trials) == 3 and all(re.search(r"val_accuracy \d\.\d{4},", line) for line in trials), trials
    assert any(line.startswith("  done   evaluate") and "chosen" in line and "KiB" in line for line in lines)
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert {"validate.log", "search-worker-0.log", "search-worker-1.log", "finetune.log", "export.log"} <= logs
    assert "Got executor_input" in (run_dir / "logs" / "finetune.log").read_text()


@pytest.mark.e2e
def test_a_failed_gate_exports_nothing_and_says_why(gate_failed_run):
    run_dir, table, destination = gate_failed_run
    assert "NOT exported" in table and "min_accuracy" in table
    assert not destination.exists()
    # The else branch recorded, per candidate, the thresholds it missed.
    report = next(run_dir.glob("gate-failed/report")).read_text()
    assert "Not exported" in report and "min_accuracy" in report and "baseline" in report


def test_a_bad_setting_from_the_run_form_fails_in_the_validation_step_and_nothing_else_starts(tmp_path, capfd):
    # The Kubeflow UI's run form skips `kftune run-local`'s check: the compiled pipeline's first step is it.
    from kfp import components, local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=False)
    pipeline = components.load_component_from_file(str(cli.COMPILED))
    pipeline(max_trials=8, parallel_trials=9)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in run_dir.iterdir()) == ["validate"]
    lines = [line.strip() for line in capfd.readouterr().out.splitlines() if "kftune: error:" in line]
    assert len(lines) == 1 and "`parallel_trials`=9 is more than `max_trials`=8" in lines[0], lines
