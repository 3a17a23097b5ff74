"""One measurement in a fresh Python process, as each pipeline step runs in its own pod.

A bench script that measures peak memory or start-up cost must not carry one
measurement's allocations, graphs or imports into the next, so it runs itself
again with ``--child ARGS``: :func:`add_option` declares that flag,
:func:`answer` makes the child print its measurement (a JSON object) and
:func:`measure_in_child` starts one and reads it back.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_option(parser: argparse.ArgumentParser, nargs: int) -> None:
    parser.add_argument("--child", nargs=nargs, help=argparse.SUPPRESS)


def answer(args: argparse.Namespace, child: Callable[..., dict]) -> bool:
    """In a child process, prints ``child(*args.child)`` and returns True; in the parent, returns False."""
    if not args.child:
        return False
    print(json.dumps(child(*args.child)))
    return True


def measure_in_child(script: str, *args: str, label: str) -> dict:
    """Runs ``script --child ARGS`` in a fresh interpreter and returns what it printed last."""
    process = subprocess.run([sys.executable, script, "--child", *map(str, args)], cwd=ROOT,
                             capture_output=True, text=True)
    if process.returncode:
        raise SystemExit(f"{label} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])
