"""The one way bench/ times things: interleaved rounds, warm-up dropped, median [min-max], threads stated.

Every timed figure a bench script prints is the median of at least :data:`MIN_REPEATS` rounds with the
minimum and maximum beside it. In each round every candidate is measured once, in an order that rotates
from round to round, so that a burst of load on a shared machine falls on all of them rather than on
whichever happened to be running; a warm-up call of each (tracing, allocation, caches) comes first and
is not counted. A ratio between two candidates is taken within each round (they ran side by side) and
reported the same way; a target is judged on the median.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable

MIN_REPEATS = 5


def spread(values: Iterable[float], fmt: str = "{:,.2f}") -> str:
    """``median [min-max]`` of ``values``, each formatted with ``fmt``."""
    values = list(values)
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Round by round ``numerator / denominator``: the two were measured in the same round."""
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def interleaved(candidates: dict[str, Callable[[], float]], repeats: int = MIN_REPEATS, *, warmup: bool = True,
                until: float | None = None, progress: Callable[[str], None] | None = None,
                fmt: str = "{:,.2f}") -> dict[str, list[float]]:
    """Calls every candidate once per round for ``repeats`` rounds, the order rotating each round, after one
    uncounted warm-up call of each (``warmup``). Returns each candidate's measurements, one per round.

    ``until`` (a time.monotonic() deadline) stops before a round the last one says would end after it; the
    lists are then shorter than ``repeats``, which the caller reports.
    """
    names = list(candidates)
    if warmup:
        for name in names:
            candidates[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    last = 0.0
    for round_ in range(repeats):
        if until is not None and round_ and time.monotonic() + last > until:
            break
        started = time.monotonic()
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            values[name].append(candidates[name]())
        last = time.monotonic() - started
        if progress:
            progress(f"round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {fmt.format(v[-1])}" for n, v in values.items()))
    return values


def threads() -> str:
    """The thread counts TensorFlow and the process run with, for the line every timed script prints."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = f"{os.cpu_count()} CPUs, {usable} usable"
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        inter = tf.config.threading.get_inter_op_parallelism_threads()
        line += (f"; TensorFlow intra-op {intra or f'{usable} (default: one per usable CPU)'}, "
                 f"inter-op {inter or f'{usable} (default)'}")
    return line


def progress(line: str) -> None:
    """Progress to stderr, so that stdout (what bench/record.py keeps) holds only the results."""
    print(line, file=sys.stderr, flush=True)
