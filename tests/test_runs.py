"""The local runs' pages and records (pipelines/runs.py): index.html, run.json, `kftune runs`, open and compare.

The runs are real: the suite's end-to-end run (conftest's ``local_run``), its
second real run, whose gate fails (``gate_failed_run``), and one run that fails
in its ingest step, a few seconds in. Copies of the first stand for older runs.
"""

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines import cli, runs

ARTIFACTS = {
    "split": "train",  # ingest's summary
    "augment": "draws of the augmentation",  # the grid's caption
    "search": "objective",  # trials table
    "finetune": "Fine-tuning curves",
    "prune": "sparsity",
    "evaluate": "gate",  # candidates table
}


def _page(run_dir: Path) -> str:
    return (run_dir / "index.html").read_text()


def _section(page: str, key: str) -> str:
    """The HTML of one section of a run's page, up to the next section."""
    start = page.index(f"<h3 id='{key}'>")
    end = page.find("<h3 id=", start + 1)
    return page[start:end if end > 0 else len(page)]


@pytest.mark.e2e
def test_the_run_page_shows_every_step_with_its_log_and_every_artifact(local_run):
    run_dir, table, destination = local_run
    page = _page(run_dir)
    assert f"run page: {run_dir / 'index.html'}" in table
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "SUCCEEDED" and record["failed_task"] == ""
    labels = [task["label"] for task in record["tasks"]]
    assert labels[:3] == ["validate", "ingest", "augment"] and labels[-1] == "export", labels
    assert {"search-worker[0]", "search-worker[1]", "search-result", "finetune", "prune", "evaluate"} <= set(labels)
    steps = _section(page, "steps")
    for task in record["tasks"]:
        assert task["status"] == "succeeded" and task["seconds"] > 0, task
        assert f"<td class='nowrap'>{task['label']}</td>" in steps
        if task["headline"]:
            assert html.escape(task["headline"]) in steps
    # One log link per step, each to a file that exists.
    links = re.findall(r"href='(logs/[^']+)'", steps)
    assert len(links) == len(labels) and all((run_dir / link).is_file() for link in links), links
    # Every artifact the Run UI shows, each in its section; the pictures embedded.
    for key, text in ARTIFACTS.items():
        assert text in _section(page, key), key
    evaluate = _section(page, "evaluate")
    assert "<table class='cm'>" in evaluate and "Confusion matrix" in evaluate and "Per class" in evaluate
    pictures = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    # The augmentation grid, the trials plot, the learning curves, the candidates' accuracy against size.
    assert len(pictures) >= 4 and all(p.startswith("data:image/png;base64,") for p in pictures)
    for key in ("augment", "search", "finetune", "evaluate"):
        assert "data:image/png;base64," in _section(page, key), key
    # The settings: every parameter set for the run, and the export.
    settings = _section(page, "settings")
    assert "export_destination" in settings and str(destination) in settings and "max_trials" in settings
    assert record["exported_uri"] == str(destination / "1") and str(destination / "1") in _section(page, "export")
    assert record["chosen"] and record["test"]["accuracy"] > 0.5 and record["figures"]["search"]["trials"] == 3


@pytest.mark.e2e
def test_kftune_runs_lists_runs_newest_first_and_opens_the_newest(local_run, tmp_path, capsys, monkeypatch):
    run_dir, _, _ = local_run
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(run_dir, root / run_dir.name)
    # An older run from before run.json and index.html: listed from its folder, its page written when opened.
    older = root / "kftune-tuning-2020-01-02-03-04-05-000000"
    shutil.copytree(run_dir, older)
    (older / "run.json").unlink()
    (older / "index.html").unlink()
    (tmp_path / "runs" / "kftune-search").mkdir()  # the search state's folder is not a run

    assert cli.main(["runs", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "started", "status", "chosen", "test", "accuracy", "gzip", "size", "export"]
    record = json.loads((run_dir / "run.json").read_text())
    newest, oldest = lines[2], lines[3]
    assert len(lines) == 4, lines
    assert newest.startswith(run_dir.name) and "SUCCEEDED" in newest and record["chosen"] in newest
    assert f"{record['test']['accuracy']:.4f}" in newest and record["exported_uri"] in newest and " KiB " in newest
    assert oldest.startswith(older.name) and "2020-01-02 03:04" in oldest and "SUCCEEDED" in oldest

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert cli.main(["runs", "open", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str((root / run_dir.name / "index.html").resolve())
    assert cli.main(["runs", "open", older.name, "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str((older / "index.html").resolve())
    page = _page(older)
    assert "<h3 id='prune'>" in page and "search-worker[1]" in page and "logs/export.log" in page


@pytest.mark.e2e
def test_compare_puts_the_parameter_that_differs_first_then_each_stage_side_by_side(local_run, gate_failed_run,
                                                                                    tmp_path, capsys):
    first, second = local_run[0], gate_failed_run[0]
    output = tmp_path / "compare.html"
    assert cli.main(["runs", "compare", str(first), str(second), "--output", str(output)]) == 0
    text = capsys.readouterr().out
    differ = text.index("parameters that differ")
    figures = text.index("figures per stage")
    min_accuracy = next(line for line in text.splitlines() if line.startswith("min_accuracy"))
    assert differ < text.index("min_accuracy") < figures and min_accuracy.split()[1:] == ["0.0", "1.0"], text
    assert "max_trials" not in text[differ:figures]  # the same in both
    rows = {tuple(line.split()[:-2]): line.split()[-2:] for line in text[figures:].splitlines()[3:]}
    assert rows[("evaluate", "gate")] == ["passes", "fails"], text
    for stage in ("search", "fine-tune", "prune", "int8"):
        accuracies = rows[(stage, "test", "accuracy")] if stage != "int8" else rows[("int8", "TFLite", "test", "accuracy")]
        assert all(0 < float(a) <= 1 for a in accuracies), (stage, text)
    assert all(float(s) > 0 for s in rows[("search", "time", "s")])
    page = output.read_text()
    assert page.index("Parameters that differ") < page.index("min_accuracy") < page.index("Figures per stage")
    # The trials plot, the learning curves and the candidates' plot of each run.
    assert page.count("<figure>") == 6 and page.count("data:image/png;base64,") >= 6 and "not produced" not in page
    assert f"{first.name}</a>" in page and f"{second.name}</a>" in page


def test_a_run_that_does_not_exist_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["runs", "compare", "nowhere", str(tmp_path), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run `nowhere`" in err[0] and "kftune runs --root" in err[0], err
    assert cli.main(["runs", "open", "--root", str(tmp_path / "none")]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert cli.main(["runs", "--root", str(tmp_path)]) == 0


@pytest.mark.e2e
def test_a_failed_run_has_a_page_that_names_the_failed_step_and_links_its_log(tmp_path, capsys):
    # A real run that fails in its second step: class folders that hold no image.
    source = tmp_path / "no-images"
    for name in ("cats", "dogs"):
        (source / name).mkdir(parents=True)
        (source / name / "README.txt").write_text("the photos are elsewhere")
    root = tmp_path / "runs"
    assert cli.main(["run-local", f"source={source}", "--pipeline-root", str(root)]) == 1
    out = capsys.readouterr().out
    (run_dir,) = [p for p in root.iterdir() if runs.is_run(p)]
    assert f"kftune: the run's page: {run_dir / 'index.html'}" in out
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "FAILED" and record["failed_task"] == "ingest"
    statuses = {task["label"]: task["status"] for task in record["tasks"]}
    assert statuses["validate"] == "succeeded" and statuses["ingest"] == "failed"
    assert {statuses[name] for name in ("augment", "search-result", "finetune", "prune", "evaluate")} == {"not run"}
    ingest = next(task for task in record["tasks"] if task["label"] == "ingest")
    assert "holds no images" in ingest["headline"]

    page = _page(run_dir)
    assert "<span class='badge bad'>FAILED</span>" in page
    failed = re.search(r"<p class='fail'>Step ingest failed after [\d.]+ s: ([^<]*)</p>", page)
    assert failed and "holds no images" in failed.group(1), page[:3000]
    assert "<a href='logs/ingest.log'>ingest.log</a>" in page and (run_dir / "logs" / "ingest.log").is_file()
    assert "<h3 id='split'>" not in page  # nothing made by a step that failed or never ran

    assert cli.main(["runs", "--root", str(root)]) == 0
    assert "FAILED at ingest" in capsys.readouterr().out
