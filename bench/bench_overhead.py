"""Where each step's time goes in the default `make run`: process start, imports, the step's own work.

    nice -n 10 .venv/bin/python bench/bench_overhead.py            # the default run (bundled digits), 5 times
    nice -n 10 .venv/bin/python bench/bench_overhead.py [--repeats N] ARGS...    # with pipeline parameters

Runs the compiled pipeline with kfp.local's SubprocessRunner, as `make run` does,
with a ``sitecustomize`` hook on the task processes' path that times, inside each
task's process: its start (the kernel's start time of the process) to KFP's
executor calling the component; the imports the component's body makes
(TensorFlow, kftune and the kftune modules it names, imported just before the
body is called, so that the body then finds them loaded); and the body itself,
which is the step's own work, local artifact reads and writes included (on a
cluster the launcher's downloads and uploads come on top). The task's wall time
is the run-local console's (from kfp.local handing the task to its runner to the
task's end); what is left of it after the three is kfp.local's own bookkeeping
and the process exit. Tasks that run at once under one name (the search
workers) are summed, as their processes' times are. The pipeline runs ``--repeats`` times (5); each
figure is the median of the runs with the minimum and maximum beside it. The hook imports TensorFlow for every component, so
validate's row counts TensorFlow's import although its own body does not need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import timing

ROOT = Path(__file__).resolve().parents[1]

HOOK = textwrap.dedent('''
    import os, sys, time
    # While site runs, `python -m kfp.dsl.executor_main ...` shows as ['-m', ...]: the flag names the executor.
    if "--function_to_execute" in sys.argv:
        import inspect, json, re
        from kfp.dsl import executor

        def _process_start():
            # Measured back from now through /proc/uptime (10 ms steps): /proc/stat's boot time is whole seconds.
            ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
            uptime = float(open("/proc/uptime").read().split()[0])
            return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))

        _execute = executor.Executor.execute

        def execute(self):
            called = time.time()
            real = self.func
            source = inspect.getsource(real)
            names = set(re.findall(r"from kftune import ([\\w, ]+)", source))
            modules = {"kftune." + n.split(" as ")[0].strip() for group in names for n in group.split(",")}
            modules |= set(re.findall(r"from (kftune\\.\\w+) import", source))
            import importlib
            import tensorflow  # noqa: F401
            for module in sorted(modules):
                importlib.import_module(module)
            imported = time.time()
            times = {}

            def timed(*args, **kwargs):
                times["start"] = time.time()
                try:
                    return real(*args, **kwargs)
                finally:
                    times["end"] = time.time()

            timed.__signature__ = inspect.signature(real)
            timed.__name__ = real.__name__
            self.func = timed
            try:
                return _execute(self)
            finally:
                with open(os.environ["KFTUNE_STEP_TIMES"], "a") as f:
                    f.write(json.dumps({"component": real.__name__, "process_start": _process_start(),
                                        "called": called, "imported": imported, "body_start": times.get("start"),
                                        "body_end": times.get("end")}) + "\\n")

        executor.Executor.execute = execute
''')


def run_once(argv: list[str], tmp: Path, repeat: int) -> tuple[float, dict[str, dict[str, float]], str]:
    """One run of the pipeline under the hook: its wall time, each component's seconds (summed over its tasks) and
    the run-local table."""
    from pipelines import cli, local_runner

    times_file = Path(tmp, f"times-{repeat}.jsonl")
    os.environ["KFTUNE_STEP_TIMES"] = str(times_file)
    # The console run_local prints through also times every task.
    seen, console = [], local_runner.console

    @contextlib.contextmanager
    def keeping(*args, **kwargs):
        with console(*args, **kwargs) as shown:
            seen.append(shown)
            yield shown

    local_runner.console = keeping
    try:
        started = time.time()
        arguments = cli.parse_arguments(argv, cli.COMPILED)
        _, table = cli.run_local(arguments, Path(tmp, f"runs-{repeat}"))
        wall = time.time() - started
    finally:
        local_runner.console = console
    # Summed over a component's tasks, as its processes' times are: two search workers side by side count twice.
    task_seconds = {name: sum(end - start for start, end in spans) for name, spans in seen[0].spans.items()}
    records = [json.loads(line) for line in times_file.read_text().splitlines()]
    per = defaultdict(lambda: defaultdict(float))
    for r in records:
        step = per[r["component"]]
        step["tasks"] += 1
        step["start"] += r["called"] - r["process_start"]
        step["imports"] += r["imported"] - r["called"]
        step["body"] += (r["body_end"] or r["imported"]) - (r["body_start"] or r["imported"])
    for name, seconds in task_seconds.items():
        per[name.replace("-", "_")]["task"] += seconds
    for s in per.values():
        s["rest"] = s["task"] - s["start"] - s["imports"] - s["body"]
        s["share"] = s["body"] / s["task"] if s["task"] else 0.0
    return wall, {name: dict(s) for name, s in per.items() if s["tasks"]}, table


def main(argv: list[str]) -> None:
    repeats = timing.MIN_REPEATS
    if argv[:1] == ["--repeats"]:
        repeats, argv = int(argv[1]), argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        hook_dir = Path(tmp, "hook")
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(HOOK)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(hook_dir), str(ROOT), os.environ.get("PYTHONPATH", "")])
        sys.path.insert(0, str(ROOT))
        walls, runs = [], []
        for repeat in range(repeats):
            wall, per, table = run_once(argv, Path(tmp), repeat)
            walls.append(wall)
            runs.append(per)
            timing.progress(f"run {repeat + 1}/{repeats}: {wall:.0f} s wall")
            if repeat == 0:
                print(table)

    # Each cell: median [min-max] over the runs (one pipeline, nothing to interleave; no warm-up run is dropped,
    # as every task is a fresh process: a cold start is what each step pays).
    print(f"\n{repeats} runs of the pipeline, one after the other; wall time per run {timing.spread(walls, '{:.0f}')} s; "
          f"threads: {timing.threads()} (each task a process of its own, TensorFlow's default pools). "
          "Per component, summed over its tasks, seconds, median [min-max] of the runs:\n")
    print("| component | tasks | kfp.local task time | process start to executor | imports (TF + kftune) "
          "| body (own work) | rest (kfp.local, exit) | own work share |")
    print("|---|---|---|---|---|---|---|---|")
    for name, first in runs[0].items():
        values = {key: [run[name][key] for run in runs if name in run] for key in first}
        print(f"| {name} | {first['tasks']:.0f} | {timing.spread(values['task'], '{:.1f}')} "
              f"| {timing.spread(values['start'], '{:.1f}')} | {timing.spread(values['imports'], '{:.1f}')} "
              f"| {timing.spread(values['body'], '{:.1f}')} | {timing.spread(values['rest'], '{:.1f}')} "
              f"| {timing.spread([v * 100 for v in values['share']], '{:.0f}%')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
