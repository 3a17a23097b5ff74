"""bench/gpu.py (make bench-gpu): without a GPU it says it skipped and exits 0; its CPU dry run, on request."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES=-1 hides any GPU from TensorFlow, so the test means the same on a GPU machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_a_gpu_it_says_in_one_line_that_it_skipped_and_exits_0():
    done = run(timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("no GPU visible to TensorFlow: the GPU benchmark was skipped"), lines


@pytest.mark.skipif(os.environ.get("KFTUNE_GPU_DRY_RUN") != "1",
                    reason="about a minute: set KFTUNE_GPU_DRY_RUN=1 to run bench/gpu.py --force-cpu --quick")
def test_the_cpu_dry_run_measures_every_part_and_prints_one_table():
    done = run("--force-cpu", "--quick", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "GPU: none: the CPU (forced)" in out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| part | measure | median [min-max] | how |")
    for measure in ("img/s, float32", "img/s, mixed_float16", "mixed_float16 / float32", "img/s, online",
                    "img/s, pre-augmented in memory", "augmentation's share of step time", "trials per hour",
                    "seconds per trial"):
        assert any(f"| {measure} |" in row for row in table), measure
    assert sum("mixed_float16 / float32" in row for row in table) == 2  # the head phase and the unfrozen one
