"""``kftune compile --check``: exit 0 on a current YAML, 1 with a short summary on a stale one, never a write."""

import subprocess
import sys
from pathlib import Path

from pipelines import cli

ROOT = Path(__file__).resolve().parents[1]
CPU_IMAGE = "image: ghcr.io/kftune/kftune-cpu:0.1.0"


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_the_checked_in_yaml_passes_and_is_not_rewritten(capsys):
    before = _state(cli.COMPILED)
    assert cli.main(["compile", "--check"]) == 0, capsys.readouterr().err
    assert "is current" in capsys.readouterr().out
    assert _state(cli.COMPILED) == before


def test_a_stale_copy_exits_1_with_the_changed_lines_and_the_command_that_fixes_it(tmp_path):
    stale = tmp_path / "pipeline.yaml"
    text = cli.COMPILED.read_text()
    assert CPU_IMAGE in text
    stale.write_text(text.replace(CPU_IMAGE, "image: ghcr.io/kftune/kftune-cpu:0.0.9", 1))
    before = _state(stale)
    process = subprocess.run([sys.executable, "-m", "pipelines.cli", "compile", "--check", "--output", str(stale)],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert process.returncode == 1, process.stdout + process.stderr
    message = process.stderr
    assert message.startswith(f"kftune: `{stale}` is stale: ") and "1 line(s) removed and 1 added" in message, message
    assert "-        image: ghcr.io/kftune/kftune-cpu:0.0.9" in message
    assert f"+        {CPU_IMAGE}" in message
    assert "KFTUNE_REGISTRY" in message  # an image line changed: the environment may be why
    assert message.rstrip().endswith(f"Run `kftune compile --profile gke-gpu --output {stale}`.")
    assert len(message.splitlines()) < 12, message
    assert _state(stale) == before


def test_a_stale_checked_in_yaml_says_make_compile_and_shows_only_the_first_changes(tmp_path, monkeypatch):
    checked_in = tmp_path / "tuning_pipeline.yaml"
    # Every fifth line but the images' changed: a long diff, cut after its first lines.
    lines = cli.COMPILED.read_text().splitlines(keepends=True)
    touched = [i for i, line in enumerate(lines) if i % 5 == 0 and not line.lstrip().startswith("image:")]
    checked_in.write_text("".join(f"# was {line}" if i in touched else line for i, line in enumerate(lines)))
    monkeypatch.setattr(cli, "COMPILED", checked_in)
    summary = cli.check_compiled(checked_in, "gke-gpu", shown=6)
    changed = len(touched)
    assert f"with {changed} line(s) removed and {changed} added" in summary, summary
    assert summary.splitlines()[1].startswith("@@ ") and len(summary.splitlines()) == 1 + 6 + 1 + 1, summary
    assert "more diff line(s)" in summary
    assert "KFTUNE_REGISTRY" not in summary  # no image line among the changes
    assert summary.endswith("Run `make compile` and commit the result.")


def test_a_missing_yaml_fails_and_is_not_created(tmp_path, capsys):
    missing = tmp_path / "build" / "none.yaml"
    assert cli.main(["compile", "--check", "--profile", "cpu", "--output", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"`{missing}` does not exist: run `kftune compile --profile cpu --output {missing}`." in err
    assert not missing.exists() and not missing.parent.exists()


def test_another_profile_is_checked_against_its_own_compile(tmp_path, capsys):
    cpu = cli.compile_pipeline(tmp_path / "cpu.yaml", "cpu")
    assert cli.main(["compile", "--check", "--profile", "cpu", "--output", str(cpu)]) == 0
    # The default profile's compile is not the cpu one's: the same file is stale for it.
    assert cli.main(["compile", "--check", "--output", str(cpu)]) == 1
    assert "is stale" in capsys.readouterr().err
