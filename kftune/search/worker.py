"""Search workers: each asks the oracle for a trial, trains it in its trial process, tells the result.

* :func:`work` is one search worker: it asks for a trial, trains it (in a
  child process, :class:`TrialProcess`), tells the result, and goes on until the
  search is done. Any number of workers, each its own pod, share one oracle at
  ``search_state_uri``, taking turns through a lock (:func:`kftune.search.oracles.oracle_turn`);
* :func:`search` runs a whole search in one process.

A worker started again gets its own unfinished trial back and resumes it from
its last epoch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from kftune import search_state
from kftune.errors import InputError, StorageError
from kftune.search.config import SearchConfig
from kftune.search.oracles import (
    IDLE,
    IDLE_TIMEOUT_S,
    STOPPED,
    ask,
    best,
    oracle_turn,
    results,
    tell,
)
from kftune.search.trials import FAILED, TrialResult, own_values, run_stored_trial

# A worker's trials run in one child process, not in the worker's own: a trial that crashes the
# process (out of memory, a native fault) ends only that process. It is replaced after a trial that
# failed (which may leave the GPU's memory fragmented) and after this many trials (TensorFlow keeps
# a little of every model a process built). Starting a process costs seconds (TensorFlow's import,
# its first trace; CUDA's start on a GPU): a process per trial was 54 s of a 94 s, 9-trial search.
TRIALS_PER_PROCESS = 16


class TrialProcess:
    """Runs a worker's trials, one at a time, in a child process it replaces when needed.

    The child is ``python -m kftune.search FD``: it reads one trial a line on stdin and
    writes each result as a line to descriptor FD, so that its stdout and stderr (Keras'
    epoch lines) stay the worker's log. A child that ends mid-trial leaves the pipe closed.
    """

    def __init__(self):
        self._child, self._results, self._ran = None, None, 0

    def run(self, dataset_dir: str | Path, trial: dict, config: SearchConfig) -> TrialResult:
        import os
        import subprocess
        import sys

        if self._child is None:
            read, write = os.pipe()
            self._child = subprocess.Popen([sys.executable, "-m", "kftune.search", str(write)], stdin=subprocess.PIPE,
                                           pass_fds=(write,), text=True)
            os.close(write)
            self._results, self._ran = os.fdopen(read), 0
        # sys.path too: the child imports the user's model module wherever the worker finds it.
        request = {"dataset_dir": str(dataset_dir), "trial": trial, "config": dataclasses.asdict(config),
                   "sys_path": sys.path}
        try:
            self._child.stdin.write(json.dumps(request) + "\n")
            self._child.stdin.flush()
            line = self._results.readline()
        except BrokenPipeError:
            line = ""
        self._ran += 1
        if not line:
            code = self.close()
            return TrialResult(trial["trial_id"], own_values(trial["values"]), status=FAILED,
                               error=f"the trial's process ended with exit code {code} before the trial did "
                                     "(killed, or out of memory?)")
        answer = json.loads(line)
        if "input_error" in answer:
            self.close()
            raise InputError(answer["input_error"])
        result = TrialResult.from_json(answer["result"])
        if result.status == FAILED or self._ran >= TRIALS_PER_PROCESS:
            self.close()
        return result

    def close(self) -> int | None:
        """Ends the child (it exits when its stdin closes); returns its exit code."""
        if self._child is None:
            return None
        try:
            self._child.stdin.close()
        except BrokenPipeError:
            pass
        code = self._child.wait()
        self._results.close()
        self._child = self._results = None
        return code


def _serve(results_fd: int) -> int:
    """The child of :class:`TrialProcess`: one trial a line on stdin, one result a line to ``results_fd``."""
    import os
    import sys
    import threading

    worker = os.getppid()

    def end_with_the_worker():
        # A worker killed mid-trial (SIGKILL, no chance to close the pipe) must not leave its trial training
        # on: the worker started again resumes that trial, and two processes would write its folder.
        while os.getppid() == worker:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=end_with_the_worker, daemon=True).start()
    with os.fdopen(results_fd, "w") as results_out:
        for line in sys.stdin:
            request = json.loads(line)
            sys.path[:0] = [entry for entry in request["sys_path"] if entry not in sys.path]
            try:
                result = run_stored_trial(request["dataset_dir"], request["trial"], SearchConfig(**request["config"]))
                answer = {"result": result.to_json()}
            except InputError as e:
                answer = {"input_error": str(e)}
            results_out.write(json.dumps(answer) + "\n")
            results_out.flush()
    return 0


def work(
    dataset_dir: str | Path,
    config: SearchConfig,
    worker: int = 0,
    *,
    in_child: bool = True,
    progress: Callable[[str], None] = print,
    poll: float = 1.0,
) -> list[TrialResult]:
    """One search worker: asks for a trial, trains it, tells the result, until the search is done.

    Any number of workers may run at once against one ``config.search_state_uri``
    (they take turns at the oracle through a lock), each in its own pod; the
    search ends when every worker has stopped. A worker that is restarted
    (a preempted pod, a retried task) resumes its unfinished trial from its last
    epoch. Trials run in a child process (:class:`TrialProcess`) unless ``in_child``
    is False. Returns the trials this worker ran.
    """
    if not config.search_state_uri:
        raise InputError("`search_state_uri` is empty: give a folder or gs:// prefix that outlives the run.")
    name, ran, idle_since, wait = f"worker{worker}", [], None, poll
    if worker == 0 and (note := config.partial_grid()):
        progress(note)
    processes = TrialProcess() if in_child else None
    try:
        while True:
            with oracle_turn(config.search_state_uri) as oracle_dir:
                status, trial = ask(config, oracle_dir, name)
            if status == STOPPED:
                return ran
            if status == IDLE:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > IDLE_TIMEOUT_S:
                    raise StorageError(f"search worker {worker} waited {IDLE_TIMEOUT_S:.0f} s for other workers' "
                                       f"trials at `{config.search_state_uri}`: a worker stopped without finishing. "
                                       "Rerun the pipeline with the same search_state_uri to resume.")
                # Each ask is an oracle turn (the lock, a listing, the oracle's files): ask less often the longer
                # the other workers' trials take.
                time.sleep(wait)
                wait = min(wait * 1.5, 30.0)
                continue
            idle_since, wait = None, poll
            progress(f"search: worker {worker} trains trial {trial['trial_id']} "
                     f"{json.dumps(own_values(trial['values']))}")
            if processes is not None:
                result = processes.run(dataset_dir, trial, config)
            else:
                result = run_stored_trial(dataset_dir, trial, config, verbose=0)
            with oracle_turn(config.search_state_uri) as oracle_dir:
                tell(config, oracle_dir, [result])
                told = len(results(oracle_dir))
            ran.append(result)
            # Hyperband's brackets, not max_trials, set how many trials it runs.
            budget = "" if config.search_algorithm == "hyperband" else f" of {config.max_trials}"
            progress(f"search: trial {result.trial_id} {result.describe()} ({told}{budget} told)")
    finally:
        if processes is not None:
            processes.close()


def search(
    dataset_dir: str | Path,
    config: SearchConfig,
    *,
    progress: Callable[[str], None] = print,
) -> TrialResult:
    """Runs a whole search in this process, one trial at a time, and returns the best trial."""
    work(dataset_dir, config, in_child=False, progress=progress)
    with search_state.opened(config.search_state_uri, write=False) as oracle_dir:
        return best(oracle_dir)
