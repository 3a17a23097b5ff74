"""bench/record.py: a command's stdout recorded between its markers in the doc; nothing else touched."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "record.py"

BEFORE = "# Benchmarks\n\nHand-written text above.\n\n"
AFTER = "\n\nHand-written text below, `with backticks`.\n"


def record(doc: Path, name: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), name, "--doc", str(doc), "--", *command],
                          cwd=doc.parent, capture_output=True, text=True, timeout=60)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_replaces_only_the_text_between_its_markers_and_tees_stdout(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(BEFORE + "<!-- bench:demo start -->\nold figure 2.32x\n<!-- bench:demo end -->" + AFTER)
    command = python("print('ratio 1.59x'); print('| a | b |')")
    done = record(doc, "demo", *command)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ratio 1.59x\n| a | b |\n"  # the output, live, to our stdout
    text = doc.read_text()
    assert text.startswith(BEFORE) and text.endswith(AFTER)
    inner = text[len(BEFORE):-len(AFTER)]
    assert inner.startswith("<!-- bench:demo start -->\n") and inner.endswith("\n<!-- bench:demo end -->")
    assert "old figure" not in inner
    assert "```\nratio 1.59x\n| a | b |\n```" in inner
    assert "UTC" in inner and "Machine: " in inner and "threads" in inner and "Commit: " in inner
    assert sys.executable in inner and "exit 0" in inner


def test_a_missed_target_exit_1_is_recorded_and_passed_on(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(BEFORE)
    done = record(doc, "missed", *python("import sys; print('1.59x < 2x: missed'); sys.exit(1)"))
    assert done.returncode == 1
    text = doc.read_text()
    assert text.startswith(BEFORE)  # appended, since the markers were absent
    assert text.count("<!-- bench:missed start -->") == 1 and text.rstrip().endswith("<!-- bench:missed end -->")
    assert "1.59x < 2x: missed" in text and "exit 1 (a target missed)" in text
    # A second recording replaces the first rather than appending again.
    assert record(doc, "missed", *python("print('now 2.1x')")).returncode == 0
    text = doc.read_text()
    assert text.count("<!-- bench:missed start -->") == 1 and "now 2.1x" in text and "1.59x" not in text


def test_other_exit_codes_record_nothing_and_are_passed_on(tmp_path):
    doc = tmp_path / "benchmarks.md"
    original = BEFORE + "<!-- bench:crash start -->\nkept\n<!-- bench:crash end -->" + AFTER
    doc.write_text(original)
    done = record(doc, "crash", *python("import sys; print('half a table'); sys.exit(3)"))
    assert done.returncode == 3
    assert "nothing recorded" in done.stderr
    assert doc.read_text() == original


def test_output_with_a_fence_in_it_gets_a_longer_fence(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(BEFORE)
    assert record(doc, "fenced", *python("print('```'); print('inside')")).returncode == 0
    assert "````\n```\ninside\n````" in doc.read_text()


def test_broken_markers_are_refused_before_the_command_runs(tmp_path):
    doc = tmp_path / "benchmarks.md"
    original = BEFORE + "<!-- bench:half start -->\nno end marker\n"
    doc.write_text(original)
    done = record(doc, "half", *python("open('ran', 'w').close()"))
    assert done.returncode != 0 and "markers" in done.stderr and "bench:half end" in done.stderr
    assert not (tmp_path / "ran").exists()
    assert doc.read_text() == original


def test_a_python_crash_exit_1_with_a_traceback_records_nothing(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(BEFORE)
    done = record(doc, "crashed", *python("print('half a table'); raise AttributeError('no oracle_turn')"))
    assert done.returncode == 1
    assert "AttributeError" in done.stderr and "a crash, not a missed target" in done.stderr
    assert doc.read_text() == BEFORE
