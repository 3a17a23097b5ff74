"""TensorFlow's start-up lines, kept out of every kftune process's log, its errors kept in.

Importing TensorFlow 2.21 prints, per process, an absl banner and two notices
(oneDNN, "Could not find cuda drivers") twice, once per copy of absl it loads,
and its first device probe logs ``E0000 ... failed call to cuInit`` on any
machine without a GPU driver. None of them is affected by
``TF_CPP_MIN_LOG_LEVEL``: absl writes them to file descriptor 2 before it reads
its settings; level 3 would hide the cuInit line but with it every later C++
error. So the first ``import tensorflow`` (and its device probe) runs with
descriptor 2 pointed at a temporary file; afterwards the lines known to be
start-up notices are dropped and every other line is written to stderr as it
came. The cuInit line is dropped only when TensorFlow also said it found no
CUDA driver: on a GPU machine a failed cuInit is a real fault and stays.

``KFTUNE_TF_STARTUP_LOGS=1`` leaves TensorFlow's start-up output alone.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

_NOTICE = re.compile(
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|^[IW]\d{4} [\d:. ]+\d+ \S+\] (oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine"
    r"|TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions)"
)
_NO_DRIVER = re.compile(r"Could not find cuda drivers on your machine")
_CUINIT = re.compile(r"^E\d{4} [\d:. ]+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit")


def filter_startup(text: str) -> str:
    """The lines of TensorFlow's start-up output that are not known notices."""
    no_driver = bool(_NO_DRIVER.search(text))
    kept = [line for line in text.splitlines(keepends=True)
            if not _NOTICE.search(line.rstrip("\n")) and not (no_driver and _CUINIT.search(line))]
    return "".join(kept)


@contextlib.contextmanager
def startup_output_filtered():
    """Points descriptor 2 at a file for the block, then writes what is not a start-up notice to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = filter_startup(captured.read().decode(errors="replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run with its start-up output filtered, then the device probe."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with startup_output_filtered():
            self._loader.exec_module(module)
            # The first device probe (cuInit) logs at its first call, whoever makes it: make it here.
            module.config.list_physical_devices()

    def __getattr__(self, name):  # resource readers and the rest of the loader protocol
        return getattr(self._loader, name)


class _FirstTensorFlowImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Filters the start-up output of this process's first ``import tensorflow`` (called by ``import kftune``)."""
    if "tensorflow" in sys.modules or os.environ.get("KFTUNE_TF_STARTUP_LOGS") == "1":
        return
    if not any(isinstance(finder, _FirstTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FirstTensorFlowImport())
