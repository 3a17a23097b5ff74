"""A readable console for ``kfp.local``: one line per task, each task's full log in a file.

kfp 2.17.3's SubprocessRunner streams each task's whole output to stdout, through
the parent's ``print`` (indented by a global override of ``builtins.print``), and
frames it with root-logger lines it installs per task: the ``Got
executor_input`` JSON of every task, its outputs, a rule of dashes. kfp.local has
no option for less, so this module, the one place kftune touches kfp.local's
private functions (pinned by tests/test_local_runner.py), wraps four of them:

- ``task_dispatcher.run_single_task_implementation``: times each task, names it
  (a loop iteration gets its index: ``search-worker[1]``) and prints a line as it
  starts and as it ends, with its duration, outcome and headline figure;
- ``subprocess_task_handler.run_local_subprocess``: the same subprocess, its
  output written to ``<run folder>/logs/<task>.log``; what the console shows
  comes from kftune's own progress lines in it (trials, epochs, candidates);
- ``logging_utils.local_logger_context`` / ``indented_print`` /
  ``print_horizontal_line``: no per-task root logger, no print override, no rules.

With ``verbose`` only the log files are added and kfp.local prints as it does.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from kfp.local import (
    executor_input_utils,
    logging_utils,
    status,
    subprocess_task_handler,
    task_dispatcher,
)

KFP_VERSION = "2.17.3"
TAIL_LINES = 15
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ITERATION = re.compile(r"-iteration-(\d+)")
_EPOCH = re.compile(r"^Epoch (\d+)/(\d+)$")
# Keras' line at the end of each epoch (verbose=2), also of a fit of one epoch, which has no "Epoch 1/1" line.
_EPOCH_END = re.compile(r"^\d+/\d+ - .* - [\d.]+m?s/epoch - ")
# kftune's own lines that carry a headline figure, or say what ingest left out of the data, echoed under their task.
_ECHO = re.compile(r"^(search: trial \d+ |evaluate: \w+ \(.*\) accuracy |prune: \d+%: "
                   r"|ingest: (left out |split |skipped |\d+ image\(s\) repeat |the classes are imbalanced)|prune: \d+ training steps are too few )")


def plain(text: str) -> str:
    """``text`` without kfp.local's colour codes."""
    return _ANSI.sub("", text)


@dataclasses.dataclass
class Task:
    name: str  # the component's task name, e.g. search-worker
    label: str  # with the loop index, e.g. search-worker[1]
    log: Path
    started: float
    tail: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    last_progress: str = ""
    epochs: int = 0
    epoch: str = ""


@dataclasses.dataclass(frozen=True)
class Result:
    """One task as it ended: what the run's page and run.json (pipelines/runs.py) list."""

    label: str
    name: str
    ok: bool
    started: float
    seconds: float
    headline: str
    log: Path


def _headline(task: Task, outputs: dict) -> str:
    """The figure a person looks for when this task ends, from its outputs."""
    def meta(key):
        value = outputs.get(key)
        return getattr(value, "metadata", None) or {}

    if task.name == "validate":
        return "every parameter and location checked"
    if task.name == "ingest" and (m := meta("dataset")).get("splits"):
        order = {"train": 0, "validation": 1, "test": 2}
        splits = ", ".join(f"{int(n)} {split}" for split, n in sorted(m["splits"].items(), key=lambda kv: order.get(kv[0], 3)))
        return f"{splits} images, {len(m.get('classes', []))} classes"
    if task.name == "search-worker" and "Output" in outputs:
        return f"ran {outputs['Output']} trial(s)"
    if task.name == "search-result" and (m := meta("metrics")):
        return f"best val_accuracy {m.get('best_val_accuracy', 0):.4f} of {m.get('trials', 0):.0f} trials"
    if task.name == "finetune" and (m := meta("metrics")):
        finals = [v for k, v in m.items() if k.endswith("_val_accuracy")]
        if finals:
            trained = f"after {task.epochs} epoch(s)" if task.epochs else "read from its checkpoint, no epoch trained"
            return f"val_accuracy {finals[-1]:.4f} {trained}"
    if task.name == "prune" and (m := meta("metrics")) and "after_accuracy" in m:
        before, after = m.get("before_parameters", 0), m.get("after_parameters", 0)
        # Structured pruning removes weights instead of zeroing them: its kept model has no zeros to count.
        shrunk = f"{1 - after / before:.0%} fewer parameters" if 0 < after < before else f"sparsity {m.get('sparsity', 0):.0%}"
        return f"val_accuracy {m['after_accuracy']:.4f}, {shrunk}, gzip {m.get('after_gzip_bytes', 0) / 1024:.0f} KiB"
    if task.name == "evaluate" and (m := meta("chosen")):
        verdict = "passes the gate" if m.get("passed") else "fails the gate"
        return (f"chosen {m.get('candidate')}: accuracy {m.get('accuracy', 0):.4f}, "
                f"gzip {m.get('gzip_bytes', 0) / 1024:.0f} KiB, {verdict}")
    if task.name in ("export", "gate-failed") and "exported_uri" in outputs:
        return f"exported to {outputs['exported_uri']}" if outputs["exported_uri"] else "nothing exported"
    line = task.last_progress
    return line.partition(": ")[2] if ": " in line else line


class Console:
    """What ``kftune run-local`` prints while the pipeline runs; also times each task for the summary."""

    def __init__(self, out=None, *, verbose: bool = False):
        self.out = out or sys.stdout
        self.verbose = verbose
        self.lock = threading.Lock()
        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.run_dir: Path | None = None
        self.running: dict[str, Task] = {}
        self.results: list[Result] = []
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self._status_shown = False

    @property
    def seconds(self) -> dict[str, float]:
        """Each task name's wall time: parallel runs of one task (loop iterations) count once."""
        out = {}
        for name, spans in self.spans.items():
            total, reach = 0.0, float("-inf")
            for start, end in sorted(spans):
                total += max(0.0, end - max(start, reach))
                reach = max(reach, end)
            out[name] = total
        return out

    # -- printing
    def say(self, text: str) -> None:
        with self.lock:
            self._write(text)

    def _write(self, text: str) -> None:
        if self.verbose:
            self.out.write(text + "\n")
        else:
            clear = "\r\x1b[K" if self._status_shown else ""
            self.out.write(clear + text + "\n")
            self._status_shown = False
            self._draw_status()
        self.out.flush()

    def _draw_status(self) -> None:
        """On a terminal, one live line: the running tasks and their epoch counters."""
        if not self.tty or not self.running:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        parts = [f"{t.label} {t.epoch}".strip() for t in self.running.values()]
        self.out.write(("  running: " + ", ".join(parts))[:width])
        self._status_shown = True

    # -- events
    def started(self, task: Task) -> None:
        with self.lock:
            if self.run_dir is None:
                self.run_dir = task.log.parent.parent
                self._write(f"kftune: run folder {self.run_dir}; each task's full log is in logs/ there")
            self.running[task.label] = task
            if not self.verbose:
                self._write(f"  start  {task.label}")

    def child_line(self, task: Task, line: str) -> None:
        text = line.rstrip("\n")
        task.tail.append(text)
        stripped = text.strip()
        if _EPOCH_END.match(stripped):
            task.epochs += 1
        if m := _EPOCH.match(stripped):
            task.epoch = f"epoch {m.group(1)}/{m.group(2)}"
            if self.tty and not self.verbose:
                with self.lock:
                    self.out.write("\r\x1b[K")
                    self._draw_status()
                    self.out.flush()
            return
        if re.match(r"^[a-z-]+: ", stripped) and not stripped.startswith("kftune:"):
            task.last_progress = stripped
        if not self.verbose and _ECHO.match(stripped):
            self.say(f"         {task.label:<17} {stripped.partition(': ')[2]}")

    def finished(self, task: Task, ok: bool, outputs: dict) -> None:
        ended = time.time()
        seconds = ended - task.started
        with self.lock:
            self.running.pop(task.label, None)
            self.spans.setdefault(task.name, []).append((task.started, ended))
            headline = _headline(task, outputs) if ok else ""
            self.results.append(Result(task.label, task.name, ok, task.started, seconds, headline, task.log))
            if self.verbose:
                return
            if ok:
                self._write(f"  done   {task.label:<17} {seconds:6.1f} s" + (f"  {headline}" if headline else ""))
                return
            lines = [f"  FAILED {task.label} after {seconds:.1f} s; its log: {task.log}",
                     f"    last {len(task.tail)} lines:"]
            lines += [f"    | {line}" for line in task.tail]
            self._write("\n".join(lines))


_local = threading.local()


def _task_for(console: Console, pipeline_root: str, pipeline_resource_name: str, component_name: str) -> Task:
    name = executor_input_utils.get_local_task_resource_name(component_name)
    indices = _ITERATION.findall(pipeline_resource_name)
    label = name + (f"[{','.join(indices)}]" if indices else "")
    run_dir = Path(pipeline_root, pipeline_resource_name.split("/")[0])
    log = run_dir / "logs" / (name + "".join(f"-{i}" for i in indices) + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    return Task(name=name, label=label, log=log, started=time.time())


def _run_subprocess(full_command, env_vars=None) -> int:
    """kfp.local's run_local_subprocess, with the output written to the task's log (and streamed if verbose)."""
    task, console = getattr(_local, "task", None), getattr(_local, "console", None)
    env = {**os.environ, **env_vars} if env_vars else None
    log = open(task.log, "a", encoding="utf-8") if task else open(os.devnull, "w")  # noqa: SIM115
    with log, subprocess.Popen(full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               bufsize=1, env=env, errors="replace") as process:
        for line in iter(process.stdout.readline, ""):
            log.write(line)
            log.flush()
            if console is None or console.verbose:
                print(line, end="")
            if console is not None and task is not None:
                console.child_line(task, line)
        if console is None or console.verbose:
            print("\n")
        return process.wait()


class _NotReported(logging.Filter):
    """Drops kfp.local's own task-outcome lines: the console reports each task's outcome itself."""

    def filter(self, record):
        return "finished with status" not in record.getMessage()


@contextlib.contextmanager
def console(verbose: bool = False, out=None):
    """Patches kfp.local for the block (see the module docstring); yields the :class:`Console`."""
    shown = Console(out, verbose=verbose)
    original_run = task_dispatcher.run_single_task_implementation
    saved = {
        (task_dispatcher, "run_single_task_implementation"): original_run,
        (subprocess_task_handler, "run_local_subprocess"): subprocess_task_handler.run_local_subprocess,
        (logging_utils, "local_logger_context"): logging_utils.local_logger_context,
        (logging_utils, "indented_print"): logging_utils.indented_print,
        (logging_utils, "print_horizontal_line"): logging_utils.print_horizontal_line,
    }

    signature = inspect.signature(original_run)

    def run_task(*args, **kwargs):
        given = signature.bind(*args, **kwargs).arguments
        task = _task_for(shown, given["pipeline_root"], given["pipeline_resource_name"], given["component_name"])
        _local.task, _local.console = task, shown
        shown.started(task)
        outputs, task_status = {}, status.Status.FAILURE
        try:
            outputs, task_status = original_run(*args, **kwargs)
            return outputs, task_status
        finally:
            _local.task = _local.console = None
            shown.finished(task, task_status == status.Status.SUCCESS, outputs)

    task_dispatcher.run_single_task_implementation = run_task
    subprocess_task_handler.run_local_subprocess = _run_subprocess
    root = logging.getLogger()
    handler = None
    if not verbose:
        logging_utils.local_logger_context = contextlib.nullcontext
        logging_utils.indented_print = contextlib.nullcontext
        logging_utils.print_horizontal_line = lambda: None
        # What kfp.local still logs at WARNING and above (a failed cache write, an unresolved input) is shown.
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.addFilter(_NotReported())
        handler.setFormatter(logging.Formatter("kfp.local: %(message)s"))
        root.addHandler(handler)
    try:
        yield shown
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        if handler is not None:
            root.removeHandler(handler)
