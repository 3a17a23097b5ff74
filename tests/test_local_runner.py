"""The run-local console (pipelines/local_runner.py, kfp.local's private functions) and TensorFlow's start-up filter."""

import inspect
import os
import subprocess
import sys

import pytest
from kfp import dsl

from kftune import quiet
from pipelines import local_runner


def test_the_kfp_local_internals_wrapped_are_those_of_the_pinned_kfp():
    import kfp
    from kfp.local import logging_utils, subprocess_task_handler, task_dispatcher

    assert kfp.__version__ == local_runner.KFP_VERSION, "kfp changed: check pipelines/local_runner.py against it"
    run = inspect.signature(task_dispatcher.run_single_task_implementation).parameters
    assert {"pipeline_root", "pipeline_resource_name", "component_name"} <= set(run)
    assert list(inspect.signature(subprocess_task_handler.run_local_subprocess).parameters) == ["full_command",
                                                                                              "env_vars"]
    for name in ("local_logger_context", "indented_print", "print_horizontal_line"):
        assert callable(getattr(logging_utils, name))


@dsl.component(install_kfp_package=False)
def _square(x: int) -> int:
    print(f"square: {x} squared")
    return x * x


@dsl.component(install_kfp_package=False)
def _total(values: list) -> int:
    if sum(values) > 10:
        raise ValueError(f"the total {int(sum(values))} is over 10")
    return int(sum(values))


@dsl.pipeline
def _squares(items: list = [1, 2]) -> int:  # noqa: B006 - a pipeline parameter's default
    with dsl.ParallelFor(items) as item:
        squared = _square(x=item)
    return _total(values=dsl.Collected(squared.output)).output


def _run(tmp_path, items, verbose=False):
    import io

    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    out = io.StringIO()
    error = None
    with local_runner.console(verbose, out) as shown:
        try:
            _squares(items=items)
        except RuntimeError as e:
            error = e
    return shown, out.getvalue(), error


def test_one_line_per_task_start_and_end_with_each_log_in_a_file(tmp_path, capfd):
    shown, text, error = _run(tmp_path, [1, 2])
    assert error is None, text
    lines = text.splitlines()
    assert "  start  square[0]" in lines and "  start  square[1]" in lines and "  start  total" in lines
    done = [line for line in lines if line.startswith("  done ")]
    assert len(done) == 3 and any("square[1]" in line and " s" in line for line in done), lines
    assert len(lines) == 7, lines  # the run folder, three starts, three ends
    assert "executor_input" not in text + capfd.readouterr().out
    logs = sorted(p.name for p in (shown.run_dir / "logs").iterdir())
    assert logs == ["square-0.log", "square-1.log", "total.log"]
    assert "Got executor_input" in (shown.run_dir / "logs" / "square-1.log").read_text()
    assert "square: 2 squared" in (shown.run_dir / "logs" / "square-1.log").read_text()
    assert set(shown.seconds) == {"square", "total"} and all(s > 0 for s in shown.seconds.values())


def test_a_failed_task_names_its_log_and_shows_its_last_lines(tmp_path):
    shown, text, error = _run(tmp_path, [3, 4])
    assert error is not None and "total" in local_runner.plain(str(error))
    failed = next(line for line in text.splitlines() if line.startswith("  FAILED total"))
    assert str(shown.run_dir / "logs" / "total.log") in failed
    assert "    | ValueError: the total 25 is over 10" in text.splitlines()


def test_verbose_streams_the_tasks_output_as_kfp_local_does(tmp_path, capfd):
    shown, text, error = _run(tmp_path, [1], verbose=True)
    assert error is None
    streamed = capfd.readouterr().out
    assert "Got executor_input" in streamed and "square: 1 squared" in streamed
    assert (shown.run_dir / "logs" / "square-0.log").exists()


# ---------------------------------------------------------------- TensorFlow's start-up output

STARTUP = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796173985.594774    5370 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results.
I0000 00:00:1796173985.595795    5370 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1796173988.706370    5370 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
E0000 00:00:1796173988.706370    5370 op_kernel.cc:1857] OP_REQUIRES failed: a real error
"""


def test_startup_notices_are_dropped_and_every_other_line_kept():
    assert quiet.filter_startup(STARTUP) == (
        "E0000 00:00:1796173988.706370    5370 op_kernel.cc:1857] OP_REQUIRES failed: a real error\n")
    # With a CUDA driver present, a failed cuInit is a fault, not a notice.
    with_driver = "".join(line + "\n" for line in STARTUP.splitlines() if "cudart_stub" not in line)
    assert "failed call to cuInit" in quiet.filter_startup(with_driver)


def test_what_is_written_to_stderr_while_filtered_comes_out_unless_it_is_a_notice(capfd):
    with quiet.startup_output_filtered():
        os.write(2, STARTUP.encode())
        print("a Python warning", file=sys.stderr)
    err = capfd.readouterr().err.splitlines()
    assert sorted(err) == ["E0000 00:00:1796173988.706370    5370 op_kernel.cc:1857] OP_REQUIRES failed: a real error",
                           "a Python warning"]


def test_importing_tensorflow_in_a_kftune_process_prints_no_startup_lines():
    code = "import kftune, tensorflow as tf; tf.constant(1.0) + 1; print(type(tf.__spec__.loader).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KFTUNE_TF_STARTUP_LOGS": ""})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert done.stdout.strip() == "_QuietLoader"


@pytest.mark.parametrize("argv, code, stream, text", [
    (["--version"], 0, "out", "kftune 0.1.0"),
    (["params"], 0, "out", "max_trials (int, default"),
    (["run-local", "--help"], 0, "out", "search_algorithm (str, default"),
    (["no-such-command"], 2, "err", "invalid choice"),
])
def test_cli_conventions(argv, code, stream, text):
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert text in getattr(done, f"std{stream}")
    assert "``" not in done.stdout and ":func:" not in done.stdout  # plain text, no reST markup


def test_the_prune_headline_says_what_each_method_took_away(tmp_path):
    # Structured pruning's kept model has no zeros (whole filters are gone): "sparsity 0%" would tell a
    # user that nothing happened. Its headline counts the parameters removed; magnitude pruning's, the zeros.
    from types import SimpleNamespace

    task = local_runner.Task(name="prune", label="prune", log=tmp_path / "prune.log", started=0.0)
    structured = {"after_accuracy": 0.96, "sparsity": 0.0, "before_parameters": 282250, "after_parameters": 25332,
                  "after_gzip_bytes": 97 * 1024}
    magnitude = {**structured, "sparsity": 0.95, "after_parameters": 282250}
    assert local_runner._headline(task, {"metrics": SimpleNamespace(metadata=structured)}) == (
        "val_accuracy 0.9600, 91% fewer parameters, gzip 97 KiB")
    assert local_runner._headline(task, {"metrics": SimpleNamespace(metadata=magnitude)}) == (
        "val_accuracy 0.9600, sparsity 95%, gzip 97 KiB")


def test_the_fine_tune_headline_counts_the_epochs_trained_also_a_fit_of_one(tmp_path):
    """Keras prints no "Epoch 1/1" for a fit of one epoch; each epoch's closing line counts it."""
    import io
    from types import SimpleNamespace

    console = local_runner.Console(io.StringIO())
    task = local_runner.Task(name="finetune", label="finetune", log=tmp_path / "finetune.log", started=0.0)
    metrics = {"metrics": SimpleNamespace(metadata={"continue_val_accuracy": 0.948})}
    assert local_runner._headline(task, metrics) == "val_accuracy 0.9480 read from its checkpoint, no epoch trained"
    for line in ("fine-tune: continuing the search winner for up to 1 epochs (lr=0.001)",
                 "79/79 - 4s - loss: 0.6890 - accuracy: 0.7728 - val_loss: 0.2050 - val_accuracy: 0.9480 - 4s/epoch - "
                 "48ms/step"):
        console.child_line(task, line)
    assert local_runner._headline(task, metrics) == "val_accuracy 0.9480 after 1 epoch(s)"
    for line in ("Epoch 2/3", "79/79 - 1s - loss: 0.5 - accuracy: 0.8 - val_loss: 0.2 - val_accuracy: 0.95 - "
                 "520ms/epoch - 7ms/step"):
        console.child_line(task, line)
    assert task.epochs == 2 and task.epoch == "epoch 2/3"


def test_what_ingest_left_out_of_the_data_is_shown_under_its_task(tmp_path):
    """A user who gave a messy folder learns from run-local's screen, not from a log file, what was not used
    (and that a small training split changed the pruning schedule)."""
    import io

    out = io.StringIO()
    console = local_runner.Console(out)
    task = local_runner.Task(name="ingest", label="ingest", log=tmp_path / "ingest.log", started=0.0)
    shown = ["ingest: split folders kept as given: train from train/, validation from validation/",
             "ingest: left out 12 file(s) that are not bmp, gif, jpeg, jpg, png, webp images (.tif: 12): convert them",
             "ingest: left out 3 validation image(s) whose pixels repeat an image of an earlier split (first: a.png)",
             "ingest: 2 image(s) repeat an image of another class (first: a.png in `cat` and b.png in `dog`)",
             "ingest: skipped 1 undecodable image(s) of 40",
             "ingest: the classes are imbalanced: `rare` has 3 training images, `common` 42 (14x): accuracy mostly",
             "prune: 8 training steps are too few to prune every 10 (prune_frequency): pruning every 2 step(s) "
             "instead, 4 turns"]
    for line in ["ingest: 40 images, 2 classes from data", *shown, "ingest: wrote 28 train images"]:
        console.child_line(task, line)
    assert out.getvalue().splitlines() == [f"         {'ingest':<17} {line.partition(': ')[2]}" for line in shown]


@dsl.component(install_kfp_package=False)
def _fails(attempts: str):
    with open(attempts, "a") as f:
        f.write("attempt\n")
    raise SystemExit(2)


@dsl.pipeline
def _retried(attempts: str):
    _fails(attempts=attempts).set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2.0)


def test_run_local_takes_the_retries_out_so_a_failed_step_is_reported_at_once(tmp_path):
    """kfp.local honours a task's retry policy; the cluster profile's (3 retries, minutes of backoff) are for
    preempted GPU nodes, and on a laptop only make a user wait for a mistake to be told again."""
    import yaml
    from kfp import compiler, components, local

    from pipelines import cli

    compiled = list(yaml.safe_load_all(cli.COMPILED.read_text()))
    stripped = list(yaml.safe_load_all(cli.without_retries(cli.COMPILED.read_text())))
    assert "retryPolicy" in cli.COMPILED.read_text() and "retryPolicy" not in yaml.safe_dump_all(stripped)
    for task in compiled[0]["root"]["dag"]["tasks"].values():
        task.pop("retryPolicy", None)
    assert stripped == compiled  # nothing else changes (the platform spec document included)

    compiler.Compiler().compile(_retried, str(tmp_path / "retried.yaml"))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    pipeline = components.load_component_from_text(cli.without_retries((tmp_path / "retried.yaml").read_text()))
    with pytest.raises(RuntimeError):
        pipeline(attempts=str(tmp_path / "attempts"))
    assert (tmp_path / "attempts").read_text() == "attempt\n"
