"""The local runs of ``kftune run-local``: each run folder's page and record, and listing and comparing runs.

At the end of every local run, a failed or interrupted one too, the run folder gets

- ``run.json``: what ``kftune runs`` lists, so that listing reads one small file per
  run: the parameters, status, start, wall time, each task's status, time and
  headline, the chosen candidate, its test figures, each stage's figures and
  the export's URI;
- ``index.html``: one self-contained page (pictures embedded as data: URIs, as the
  HTML artifacts embed them; readable from 800 px): the run's settings, every
  step's status, time, headline and log, and every artifact the Kubeflow Run UI
  shows: the split, the augmentation grid, the trials, the learning curves, the
  prune report, the candidates table and plot, the confusion matrix.

    kftune runs [--root runs]                        the runs, newest first
    kftune runs open [RUN]                           the page of RUN (the newest when omitted)
    kftune runs compare RUN RUN... [--output FILE]   parameters that differ, then each stage's figures side by side

A run folder written before run.json existed is read from its task folders and
logs instead (no times or headlines), and gets its page when it is opened.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kftune import report

RUN_JSON = "run.json"
INDEX = "index.html"
TAIL_LINES = 15
# The pipeline's tasks in the order they run; after a failure, those that never started are listed as "not run".
# The gate's branches (export or gate-failed, deploy) are left out: which of them would have run is unknown.
PIPELINE_TASKS = ("validate", "ingest", "augment", "search-worker", "search-result", "finetune", "prune", "evaluate")
# The page blocks scripts and every load but its own embedded pictures: artifacts are shown, never run.
_CSP = ("<meta http-equiv='Content-Security-Policy' "
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">")
_STYLE = (
    "<style>"
    "body{max-width:1100px;line-height:1.35}h3{margin-top:1.6em;border-top:1px solid #ddd;padding-top:.6em}"
    "h4{margin:1.2em 0 .4em}h5{margin:1em 0 .3em;font-size:100%}"
    "nav{line-height:1.9}nav a{margin-right:1em;white-space:nowrap}"
    ".badge{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-weight:bold;font-size:90%}"
    ".ok{background:#137333}.bad{background:#b00020}.other{background:#777}"
    "td.text,th.text{text-align:left;white-space:normal;min-width:12em}"
    "td.nowrap{white-space:nowrap}tr.diff td{background:#fff4e0}tr.failed td{background:#fdecee}"
    ".left,table.settings td,table.settings th{text-align:left}table.cm td,table.cm thead th{text-align:center;min-width:1.6em}table.cm td.zero{color:#bbb}"
    ".muted{color:#666}code{overflow-wrap:anywhere}"
    ".pics{display:flex;flex-wrap:wrap;gap:1em}.pics figure{flex:1 1 340px;min-width:0;margin:0}"
    "figcaption{color:#555;font-size:90%;margin-bottom:.3em}"
    "</style>"
)


@dataclasses.dataclass
class TaskRecord:
    """One task of a run, as the page and ``run.json`` list it."""

    label: str  # as the console names it: search-worker[1]
    name: str  # the component's task name: search-worker
    status: str  # succeeded, failed, interrupted or not run
    seconds: float | None  # None when unknown (a run folder without run.json)
    headline: str
    log: str  # relative to the run folder; '' when the task left none


@dataclasses.dataclass
class RunSummary:
    """A run folder's ``run.json``: what listing and comparing runs read."""

    run: str
    path: Path
    status: str  # SUCCEEDED, FAILED, INTERRUPTED or UNKNOWN
    started: str  # ISO 8601 with the UTC offset
    seconds: float | None
    parameters: dict[str, Any]
    overrides: list[str]  # the parameters given on the command line
    tasks: list[TaskRecord]
    failed_task: str
    chosen: str
    passed: bool | None
    test: dict[str, float]  # the chosen candidate's accuracy, size_bytes, gzip_bytes
    exported_uri: str
    figures: dict[str, dict[str, Any]]  # stage -> figure -> value

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("path")
        return {"version": 1, **out}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> RunSummary:
        fields = {f.name for f in dataclasses.fields(cls)} - {"path", "tasks"}
        tasks = [TaskRecord(**t) for t in data.get("tasks", [])]
        return cls(path=path, tasks=tasks, **{k: v for k, v in data.items() if k in fields})

    @property
    def started_at(self) -> datetime.datetime:
        try:
            return datetime.datetime.fromisoformat(self.started)
        except ValueError:
            return datetime.datetime.fromtimestamp(0, datetime.UTC)


# ---------------------------------------------------------------- reading a run folder


def _task_outputs(run_dir: Path) -> dict[str, dict]:
    """Each task folder's executor_output.json (loop iterations aside), by task name."""
    out = {}
    for path in sorted(run_dir.glob("*/executor_output.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a task killed while writing it: its other files still show
    return out


def _metadata(outputs: dict[str, dict], task: str, artifact: str) -> dict:
    try:
        return outputs[task]["artifacts"][artifact]["artifacts"][0].get("metadata") or {}
    except (KeyError, IndexError):
        return {}


def _evaluations(run_dir: Path) -> dict[str, dict]:
    try:
        return {e["name"]: e for e in json.loads((run_dir / "evaluate" / "evaluations").read_text())}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _kib(value) -> float | None:
    return round(value / 1024, 1) if isinstance(value, int | float) else None


def _figures(run_dir: Path, outputs: dict[str, dict], tasks: Sequence[TaskRecord]) -> dict[str, dict[str, Any]]:
    """Each stage's figures: what ``kftune runs compare`` sets side by side."""
    from pipelines.cli import STAGES

    evaluations = _evaluations(run_dir)
    figures: dict[str, dict[str, Any]] = {}

    def put(stage: str, name: str, value) -> None:
        if value is not None and value != "":
            figures.setdefault(stage, {})[name] = round(value, 4) if isinstance(value, float) else value

    dataset = _metadata(outputs, "ingest", "dataset")
    for split in ("train", "validation", "test"):
        put("ingest", f"{split} images", (dataset.get("splits") or {}).get(split))
    put("ingest", "classes", len(dataset["classes"]) if dataset.get("classes") else None)
    put("augment", "mode", _metadata(outputs, "augment", "augmented").get("mode"))
    search = _metadata(outputs, "search-result", "metrics")
    put("search", "trials", search.get("trials"))
    put("search", "best val accuracy", search.get("best_val_accuracy"))
    finetune = _metadata(outputs, "finetune", "metrics")
    finals = [v for k, v in finetune.items() if k.endswith("_val_accuracy")]
    put("fine-tune", "val accuracy", finals[-1] if finals else None)
    prune = _metadata(outputs, "prune", "metrics")
    put("prune", "sparsity", prune.get("sparsity"))
    put("prune", "val accuracy", prune.get("after_accuracy"))
    for stage, candidate in (("search", "baseline"), ("fine-tune", "finetuned"), ("prune", "pruned"),
                             ("int8 TFLite", "quantized")):
        ev = evaluations.get(candidate, {})
        put(stage, "test accuracy", ev.get("accuracy"))
        put(stage, "size KiB", _kib(ev.get("size_bytes")))
        put(stage, "gzip KiB", _kib(ev.get("gzip_bytes")))
    chosen = _metadata(outputs, "evaluate", "chosen")
    put("evaluate", "chosen", chosen.get("candidate"))
    if "passed" in chosen:
        put("evaluate", "gate", "passes" if chosen["passed"] else "fails")
    exported = _exported_uri(outputs)
    if exported or "gate-failed" in outputs:
        put("export", "version", exported.rstrip("/").rsplit("/", 1)[-1] if exported else "not exported")
    seconds: dict[str, float] = {}
    for task in tasks:
        if task.seconds is not None:
            seconds[task.name] = seconds.get(task.name, 0.0) + task.seconds
    for stage, prefixes, _ in STAGES:
        spent = [s for name, s in seconds.items() if prefixes and name.startswith(prefixes)]
        if spent:
            # Search workers run at once: the console's wall time per task, summed over the stage's tasks.
            put("evaluate" if stage == "evaluate + gate" else stage, "time s", round(sum(spent), 1))
    order = ["validate", "ingest", "augment", "search", "fine-tune", "prune", "int8 TFLite", "evaluate", "export"]
    return {stage: figures[stage] for stage in sorted(figures, key=lambda s: order.index(s) if s in order else 99)}


def _exported_uri(outputs: dict[str, dict]) -> str:
    for task in ("export", "gate-failed"):
        value = outputs.get(task, {}).get("parameterValues", {}).get("exported_uri")
        if value is not None:
            return str(value)
    return ""


def _log_tail(run_dir: Path, log: str, lines: int = TAIL_LINES) -> list[str]:
    if not log:
        return []
    try:
        text = (run_dir / log).read_text(errors="replace")
    except OSError:
        return []
    kept, in_input = [], False
    for line in text.splitlines():
        # kfp's dump of the task's executor input (a JSON block) says nothing about what went wrong.
        if line.endswith("Got executor_input:"):
            in_input = True
        elif in_input:
            in_input = line != "}"
        elif line.strip():
            kept.append(line)
    return kept[-lines:]


def _error_line(tail: list[str]) -> str:
    """The line of a failed task's log that says what went wrong: kftune's error line, else the last line."""
    for line in reversed(tail):
        if "error:" in line.lower() or re.match(r"^\w+(Error|Exception)\b", line.strip()):
            return line.strip().removeprefix("kftune: error: ")
    return tail[-1].strip() if tail else ""


def _summary(run_dir: Path, tasks: list[TaskRecord], *, status: str, started: str, seconds: float | None,
             parameters: dict, overrides: list[str]) -> RunSummary:
    outputs = _task_outputs(run_dir)
    chosen = _metadata(outputs, "evaluate", "chosen")
    metrics = chosen.get("metrics") or {}
    failed = next((t for t in tasks if t.status in ("failed", "interrupted")), None)
    return RunSummary(
        run=run_dir.name, path=run_dir, status=status, started=started, seconds=seconds, parameters=parameters,
        overrides=overrides, tasks=tasks, failed_task=failed.label if failed else "",
        chosen=str(chosen.get("candidate", "")), passed=chosen.get("passed"),
        test={k: metrics[k] for k in ("accuracy", "size_bytes", "gzip_bytes") if k in metrics},
        exported_uri=_exported_uri(outputs), figures=_figures(run_dir, outputs, tasks),
    )


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _tasks_of(console, run_dir: Path, failed: bool) -> list[TaskRecord]:
    """The console's tasks in the order they started; after a failure, the steps that never started."""
    def relative(log: Path) -> str:
        try:
            return str(Path(log).relative_to(run_dir))
        except ValueError:
            return str(log)

    ended = [(r.started, TaskRecord(r.label, r.name, "succeeded" if r.ok else "failed", round(r.seconds, 1),
                                    r.headline, relative(r.log))) for r in console.results]
    now = time.time()
    # Still running when the run stopped: another task failed, or the run was interrupted.
    running = [(t.started, TaskRecord(t.label, t.name, "interrupted", round(now - t.started, 1), "", relative(t.log)))
               for t in list(console.running.values())]
    tasks = [record for _, record in sorted(ended + running, key=lambda pair: pair[0])]
    for task in tasks:
        if task.status == "failed":
            task.headline = _error_line(_log_tail(run_dir, task.log))
    if failed:
        seen = {t.name for t in tasks}
        tasks += [TaskRecord(name, name, "not run", None, "", "") for name in PIPELINE_TASKS if name not in seen]
    return tasks


def _parameters(arguments: dict) -> dict[str, Any]:
    """Every pipeline parameter's value in this run: its default, or what the command gave."""
    from kftune import parameters

    return {**parameters.defaults(), **arguments}


def write_index(run_dir: Path, console, arguments: dict, *, started: float, error: BaseException | None = None) -> Path:
    """Writes ``run.json`` and ``index.html`` in ``run_dir`` at the end of a local run; returns the page's path.

    Args:
        run_dir: The run folder (``console.run_dir``).
        console: pipelines/local_runner.py's Console of the run: each task's status, seconds and headline.
        arguments: The pipeline parameters the command gave; the others are their defaults.
        started: When the run started (``time.time()``).
        error: What stopped the run, when it did not succeed.
    """
    status = "SUCCEEDED" if error is None else "INTERRUPTED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    tasks = _tasks_of(console, run_dir, failed=error is not None)
    summary = _summary(run_dir, tasks, status=status, started=_iso(started), seconds=round(time.time() - started, 1),
                       parameters=_parameters(arguments), overrides=sorted(arguments))
    return _write(summary)


def record(console, arguments: dict, *, started: float, error: BaseException | None = None,
           run_dir: Path | None = None) -> Path | None:
    """``write_index`` for ``cli.run_local``; a page that cannot be written is one line, never the run's failure."""
    run_dir = run_dir or console.run_dir
    if run_dir is None:  # stopped before any task started: there is no run folder
        return None
    try:
        page = write_index(Path(run_dir), console, arguments, started=started, error=error)
    except Exception as e:  # noqa: BLE001 - the run's own outcome matters more than its page
        console.say(f"kftune: could not write the run's page in {run_dir}: {e}")
        return None
    if error is not None:
        console.say(f"kftune: the run's page: {page}")
    return page


def _write(summary: RunSummary) -> Path:
    run_dir = summary.path
    _atomic_write(run_dir / RUN_JSON, json.dumps(summary.to_json(), indent=1, default=str))
    page = run_dir / INDEX
    _atomic_write(page, index_html(summary))
    return page


def _atomic_write(path: Path, text: str) -> None:
    # `kftune runs` may read the folder while a run ends: it sees the old file or the new one, never half.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def is_run(path: Path) -> bool:
    """Whether ``path`` is a run folder of kfp.local (kftune's checkpoint, search and export folders are not)."""
    return path.is_dir() and ((path / RUN_JSON).is_file() or (path / "logs").is_dir()
                              or any(path.glob("*/executor_output.json")))


_FOLDER_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-\d+$")


def read(run_dir: Path) -> RunSummary:
    """A run folder's summary: its run.json, else what its task folders and logs tell (no times, no headlines)."""
    run_dir = Path(run_dir)
    try:
        return RunSummary.from_json(json.loads((run_dir / RUN_JSON).read_text()), run_dir)
    except (OSError, ValueError, TypeError):
        pass  # none, or damaged: it only saves reading the folder, which follows
    outputs = _task_outputs(run_dir)
    order = [*PIPELINE_TASKS, "export", "gate-failed", "deploy"]
    # In the pipeline's order: a copied folder's file times say nothing.
    logs = sorted((run_dir / "logs").glob("*.log"), key=lambda p: (
        next((i for i, name in enumerate(order) if p.stem == name or p.stem.startswith(f"{name}-")), len(order)), p.stem))
    tasks = []
    for log in logs:
        name, _, index = log.stem.rpartition("-")
        label = f"{name}[{index}]" if index.isdigit() else log.stem
        name = name if index.isdigit() else log.stem
        folders = [run_dir / name] if not index.isdigit() else list(run_dir.glob(f"for-loop-*-iteration-{index}/{name}"))
        done = any((folder / "executor_output.json").exists() for folder in folders)
        tasks.append(TaskRecord(label, name, "succeeded" if done else "failed", None, "", f"logs/{log.name}"))
    for task in tasks:
        if task.status == "failed":
            task.headline = _error_line(_log_tail(run_dir, task.log))
    failed = any(t.status == "failed" for t in tasks)
    status = "FAILED" if failed else "SUCCEEDED" if {"export", "gate-failed"} & set(outputs) else "UNKNOWN"
    if match := _FOLDER_TIME.search(run_dir.name):
        started = datetime.datetime(*map(int, match.groups())).astimezone().isoformat(timespec="seconds")
    else:
        started = _iso(min((log.stat().st_mtime for log in logs), default=run_dir.stat().st_mtime))
    parameters = {}
    for value in outputs.get("validate", {}).get("parameterValues", {}).values():
        # The validation step's settings per step, resolved: the closest a run without run.json has to its parameters.
        try:
            settings = json.loads(value) if isinstance(value, str) else None
        except ValueError:
            settings = None
        if isinstance(settings, dict):
            parameters.update(settings)
    return _summary(run_dir, tasks, status=status, started=started, seconds=None, parameters=parameters,
                    overrides=[])


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """The run folders under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [read(path) for path in root.iterdir() if is_run(path)]
    return sorted(found, key=lambda s: (s.started_at, s.run), reverse=True)


def resolve(run: str, root: str | Path = "runs") -> Path:
    """A RUN argument: a folder name under ``root``, or a path."""
    for candidate in (Path(root) / run, Path(run)):
        if is_run(candidate):
            return candidate
    if Path(run).is_dir() or (Path(root) / run).is_dir():
        raise _input_error(f"`{run}` is not a run folder (no run.json, logs/ or task outputs): "
                           f"`kftune runs --root {root}` lists the runs.")
    raise _input_error(f"no run `{run}` under {root}/ or at that path: `kftune runs --root {root}` lists the runs.")


def _input_error(message: str) -> Exception:
    from kftune.errors import InputError

    return InputError(message)


def open_page(run_dir: Path) -> Path:
    """The run's page, written first for a run folder that has none (one from before pages existed)."""
    page = run_dir / INDEX
    if not page.exists():
        page = _write(read(run_dir))
    return page


# ---------------------------------------------------------------- HTML


def _esc(value) -> str:
    return html.escape(str(value))


def _inline(text: str) -> str:
    """Markdown's inline code and bold, the only inline markup kftune's Markdown artifacts use."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]*)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def markdown_html(text: str) -> str:
    """kftune's Markdown artifacts (headings, tables, lists, paragraphs, code blocks) as HTML.

    Headings are demoted two levels (## is <h4>), so that they sit under the page's sections.
    """
    lines = text.splitlines()
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append(f"<pre>{html.escape(chr(10).join(lines[i + 1:j]))}</pre>")
            i = j + 1
            continue
        if line.lstrip().startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = re.split(r"(?<!\\)\|", lines[i].strip()[1:].removesuffix("|"))
                if not all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells):
                    rows.append([_inline(c.strip().replace("\\|", "|")) for c in cells])
                i += 1
            if rows:
                out.append(report.html_table(rows[0], rows[1:], escape=False))
            continue
        if m := re.match(r"^\s*[-*] (.*)", line):
            flush()
            items = []
            while i < len(lines) and (m := re.match(r"^\s*[-*] (.*)", lines[i])):
                items.append(f"<li>{_inline(m.group(1))}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        if m := re.match(r"^(#{1,6})\s+(.*)", line):
            flush()
            level = min(6, len(m.group(1)) + 2)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
        elif line.strip():
            paragraph.append(line.strip())
        else:
            flush()
        i += 1
    flush()
    return "\n".join(out)


def _html_body(path: Path) -> str:
    """An HTML artifact's body, its title and headings demoted to sit under the page's sections."""
    text = path.read_text(errors="replace")
    start, end = text.find("<body>"), text.rfind("</body>")
    if not text.lower().startswith("<!doctype html>") or start < 0 or end < start:
        return f"<pre>{html.escape(text)}</pre>"
    body = text[start + len("<body>"):end]
    body = re.sub(r"<h2>(.*?)</h2>", r"<h4>\1</h4>", body, count=1)
    return body.replace("<h3>", "<h5>").replace("</h3>", "</h5>")


def _artifact(run_dir: Path, task: str, name: str) -> str:
    """An artifact of a task as HTML: an HTML page's body, Markdown rendered, '' when the task did not write it."""
    path = run_dir / task / name
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace")
    return _html_body(path) if text.lower().startswith("<!doctype html>") else markdown_html(text)


def confusion_html(matrix: dict) -> str:
    """A ClassificationMetrics confusion matrix (the Run UI's) as a table; each cell shaded by its row's share."""
    names = [spec.get("displayName", "") for spec in matrix.get("annotationSpecs", [])]
    rows = [row.get("row", []) for row in matrix.get("rows", [])]
    head = "<th>true \\ predicted</th>" + "".join(f"<th>{_esc(n)}</th>" for n in names)
    body = []
    for i, (name, row) in enumerate(zip(names, rows, strict=False)):
        total = sum(row) or 1
        cells = []
        for j, count in enumerate(row):
            share = count / total
            colour = "#fff" if share > 0.55 else "#000"
            weight = "font-weight:bold;" if i == j else ""
            if not count:  # grey zeros, so that the counts that matter stand out
                cells.append("<td class='zero'>0</td>")
                continue
            cells.append(f"<td style='background:rgba(26,115,232,{share * 0.9:.2f});color:{colour};{weight}'>"
                         f"{int(count)}</td>")
        body.append(f"<tr><th>{_esc(name)}</th>{''.join(cells)}</tr>")
    return (f"<div class='scroll'><table class='cm'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _badge(status: str) -> str:
    kind = {"SUCCEEDED": "ok", "succeeded": "ok", "FAILED": "bad", "failed": "bad"}.get(status, "other")
    return f"<span class='badge {kind}'>{_esc(status)}</span>"


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def _link(run_dir: Path, log: str) -> str:
    if not log:
        return ""
    exists = (run_dir / log).exists()
    return f"<a href='{_esc(log)}'>{_esc(Path(log).name)}</a>" if exists else f"<span class='muted'>{_esc(log)}</span>"


def _page(title: str, *parts: str) -> str:
    return report.page(title, *parts).replace("<head>", "<head>" + _CSP, 1).replace("</head>", _STYLE + "</head>", 1)


def index_html(summary: RunSummary) -> str:
    """The run's page: status, steps, settings and every artifact, on one self-contained page."""
    run_dir = summary.path
    outputs = _task_outputs(run_dir)
    parts = [_headline_html(summary)]
    sections: list[tuple[str, str, str]] = []  # (id, title, HTML)

    rows = []
    for task in summary.tasks:
        css = " class='failed'" if task.status in ("failed", "interrupted") else ""
        rows.append(f"<tr{css}><td class='nowrap'>{_esc(task.label)}</td><td class='left'>{_badge(task.status)}</td>"
                    f"<td class='nowrap'>{_seconds(task.seconds)}</td><td class='text'>{_esc(task.headline)}</td>"
                    f"<td class='left nowrap'>{_link(run_dir, task.log)}</td></tr>")
    steps = ("<div class='scroll'><table><thead><tr><th>step</th><th class='left'>status</th><th>time</th>"
             "<th class='text'>headline</th><th class='left'>log</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table></div>")
    sections.append(("steps", "Steps", steps))
    sections.append(("settings", "Settings", _settings_html(summary)))

    sections.append(("split", "Split", _artifact(run_dir, "ingest", "summary")))
    sections.append(("augment", "Augmentation", _artifact(run_dir, "augment", "preview")))
    sections.append(("search", "Search trials",
                     _artifact(run_dir, "search-result", "trials_table") + _artifact(run_dir, "search-result", "trials_plot")))
    sections.append(("finetune", "Fine-tuning: learning curves", _artifact(run_dir, "finetune", "curves")))
    sections.append(("prune", "Prune report", _artifact(run_dir, "prune", "report_html")))
    evaluate = _artifact(run_dir, "evaluate", "report_html")
    matrix = _metadata(outputs, "evaluate", "confusion").get("confusionMatrix")
    if matrix:
        chosen = summary.chosen or "the chosen candidate"
        evaluate += f"<h4>Confusion matrix: {_esc(chosen)}, test split</h4>" + confusion_html(matrix)
    evaluate += _artifact(run_dir, "evaluate", "per_class") + _artifact(run_dir, "gate-failed", "report")
    sections.append(("evaluate", "Candidates and the gate", evaluate))
    export = ""
    if "export" in outputs or "gate-failed" in outputs:
        export = (f"<p>Exported version: <code>{_esc(summary.exported_uri)}</code></p>" if summary.exported_uri
                  else "<p>Nothing exported: no candidate passed the gate.</p>")
    export += _artifact(run_dir, "deploy", "report")
    sections.append(("export", "Export", export))

    shown = [(key, title, content) for key, title, content in sections if content]
    parts.append("<nav>" + " ".join(f"<a href='#{key}'>{_esc(title)}</a>" for key, title, _ in shown) + "</nav>")
    parts += [f"<h3 id='{key}'>{_esc(title)}</h3>\n{content}" for key, title, content in shown]
    return _page(f"kftune run {summary.run}", *parts)


def _headline_html(summary: RunSummary) -> str:
    run_dir = summary.path
    lines = [f"{_badge(summary.status)} started {_esc(_when(summary.started))}"
             + (f", {_seconds(summary.seconds)} wall time" if summary.seconds is not None else "")]
    if summary.chosen:
        accuracy = summary.test.get("accuracy")
        gzip = summary.test.get("gzip_bytes")
        figures = ", ".join(x for x in (f"test accuracy {accuracy:.4f}" if accuracy is not None else "",
                                        f"gzip {gzip / 1024:.0f} KiB" if gzip is not None else "") if x)
        lines.append(f"Chosen: <b>{_esc(summary.chosen)}</b>" + (f" ({figures})" if figures else ""))
    if summary.exported_uri:
        lines.append(f"Exported to <code>{_esc(summary.exported_uri)}</code>")
    elif summary.passed is False:
        lines.append("<span class='fail'>Not exported: no candidate passed the gate.</span>")
    out = "<p>" + "<br>".join(lines) + "</p>"
    failed = next((t for t in summary.tasks if t.label == summary.failed_task), None)
    if failed is not None:
        verb = "failed" if failed.status == "failed" else "was interrupted"
        after = f" after {_seconds(failed.seconds)}" if failed.seconds is not None else ""
        out += (f"<p class='fail'>Step {_esc(failed.label)} {verb}{after}"
                + (f": {_esc(failed.headline)}" if failed.headline else "") + "</p>")
        tail = _log_tail(run_dir, failed.log)
        if failed.log:
            out += f"<p>Its log: {_link(run_dir, failed.log)}" + (f"; its last {len(tail)} lines:" if tail else "") + "</p>"
        if tail:
            out += f"<pre>{html.escape(chr(10).join(tail))}</pre>"
    return out


def _settings_html(summary: RunSummary) -> str:
    given = [name for name in summary.overrides if name in summary.parameters]
    if given:
        rows = [[name, _value(summary.parameters[name])] for name in given]
        out = "<h4>Set for this run</h4>" + report.html_table(["parameter", "value"], rows, css="settings")
    else:
        out = "<p>Every parameter at its default.</p>" if summary.overrides == [] and summary.seconds is not None else ""
    validated = _artifact(summary.path, "validate", "settings")
    if validated:
        out += f"<details><summary>Every setting, as the validation step resolved it</summary>{validated}</details>"
    elif summary.parameters:
        rows = [[name, _value(value)] for name, value in summary.parameters.items()]
        out += ("<details><summary>Every setting</summary>" + report.html_table(["parameter", "value"], rows, css="settings")
                + "</details>")
    return out


def _value(value) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _when(started: str) -> str:
    try:
        return datetime.datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return started


# ---------------------------------------------------------------- listing and comparing


def runs_table(summaries: Sequence[RunSummary]) -> str:
    """``kftune runs``: one line per run."""
    rows = []
    for s in summaries:
        accuracy = s.test.get("accuracy")
        gzip = s.test.get("gzip_bytes")
        export = s.exported_uri or ("not exported (gate)" if s.passed is False else "")
        status = s.status + (f" at {s.failed_task}" if s.failed_task else "")
        rows.append([s.run, _when(s.started)[:16], status, s.chosen, f"{accuracy:.4f}" if accuracy is not None else "",
                     f"{gzip / 1024:.0f} KiB" if gzip is not None else "", export])
    return report.text_table(["run", "started", "status", "chosen", "test accuracy", "gzip size", "export"], rows)


def _labels(summaries: Sequence[RunSummary]) -> list[str]:
    """Short column names: the folder's timestamp (kftune-tuning-2026-12-06-23-12-03-093577 -> 2026-12-06-23-12-03)."""
    short = []
    for s in summaries:
        match = _FOLDER_TIME.search(s.run)
        short.append(s.run[match.start():match.end()].rsplit("-", 1)[0] if match else s.run)
    if len(set(short)) < len(short):
        short = [s.run for s in summaries]
    if len(set(short)) < len(short):
        short = [f"{i + 1}: {s.run}" for i, s in enumerate(summaries)]
    return short


def _differing(summaries: Sequence[RunSummary]) -> list[tuple[str, list[str]]]:
    names: list[str] = []
    for s in summaries:
        names += [n for n in s.parameters if n not in names]
    out = []
    for name in names:
        values = [_value(s.parameters[name]) if name in s.parameters else "-" for s in summaries]
        if len(set(values)) > 1:
            out.append((name, values))
    return out


def _figure_rows(summaries: Sequence[RunSummary]) -> list[tuple[str, str, list[str]]]:
    stages: list[str] = []
    for s in summaries:
        stages += [stage for stage in s.figures if stage not in stages]
    rows = []
    for stage in stages:
        names: list[str] = []
        for s in summaries:
            names += [n for n in s.figures.get(stage, {}) if n not in names]
        for name in names:
            rows.append((stage, name, [_value(s.figures.get(stage, {}).get(name, "")) for s in summaries]))
    return rows


def compare(run_dirs: Sequence[str | Path], output: str | Path) -> tuple[Path, str]:
    """Writes one page comparing runs and returns it with the same comparison as a text table.

    Parameters that differ come first, then each stage's figures side by side, and on the
    page the pictures of each stage (trials, learning curves, candidates) side by side.
    """
    summaries = [read(Path(d)) for d in run_dirs]
    labels = _labels(summaries)
    differing = _differing(summaries)
    figure_rows = _figure_rows(summaries)

    legend = report.text_table(["run", "folder", "status", "started"],
                               [[label, str(s.path), s.status + (f" at {s.failed_task}" if s.failed_task else ""),
                                 _when(s.started)[:16]] for label, s in zip(labels, summaries, strict=True)])
    text = legend + "\n\nparameters that differ\n"
    text += (report.text_table(["parameter", *labels], [[name, *values] for name, values in differing])
             if differing else "(none)")
    text += "\n\nfigures per stage\n"
    text += report.text_table(["stage", "figure", *labels], [[stage, name, *values] for stage, name, values in figure_rows])

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(output, compare_html(summaries, labels, differing, figure_rows, output.parent))
    return output, text


def compare_html(summaries: Sequence[RunSummary], labels: list[str], differing: list[tuple[str, list[str]]],
                 figure_rows: list[tuple[str, str, list[str]]], page_dir: Path) -> str:
    def head(*first: str) -> str:
        return "".join(f"<th class='text'>{_esc(h)}</th>" for h in first) + "".join(
            f"<th>{_esc(label)}</th>" for label in labels)

    legend_rows = []
    for label, s in zip(labels, summaries, strict=True):
        page = s.path / INDEX
        href = os.path.relpath(page, page_dir) if page.exists() else ""
        name = f"<a href='{_esc(href)}'>{_esc(s.run)}</a>" if href else _esc(s.run)
        legend_rows.append(f"<tr><td class='nowrap'>{_esc(label)}</td><td class='text'>{name}</td>"
                           f"<td>{_badge(s.status)}</td><td class='nowrap'>{_esc(_when(s.started))}</td></tr>")
    parts = ["<div class='scroll'><table><thead><tr><th>run</th><th class='text'>folder</th><th>status</th>"
             f"<th>started</th></tr></thead><tbody>{''.join(legend_rows)}</tbody></table></div>"]
    parts.append("<h3 id='parameters'>Parameters that differ</h3>")
    if differing:
        body = "".join(f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{_esc(v)}</td>" for v in values) + "</tr>"
                       for name, values in differing)
        parts.append(f"<div class='scroll'><table><thead><tr>{head('parameter')}</tr></thead>"
                     f"<tbody>{body}</tbody></table></div>")
    else:
        parts.append("<p>None: every parameter is the same.</p>")
    parts.append("<h3 id='figures'>Figures per stage</h3>")
    body = []
    previous = None
    for stage, name, values in figure_rows:
        # Times always differ a little: shading them would hide the rows that matter.
        css = " class='diff'" if len(set(values)) > 1 and name != "time s" else ""
        shown_stage = stage if stage != previous else ""
        previous = stage
        body.append(f"<tr{css}><td>{_esc(shown_stage)}</td><td class='text'>{_esc(name)}</td>"
                    + "".join(f"<td>{_esc(v)}</td>" for v in values) + "</tr>")
    parts.append(f"<p class='muted'>Rows that differ between the runs, times aside, are shaded.</p><div class='scroll'><table>"
                 f"<thead><tr>{head('stage', 'figure')}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")
    for task, name, title in (("search-result", "trials_plot", "Search: objective per trial"),
                              ("finetune", "curves", "Fine-tuning: learning curves"),
                              ("evaluate", "report_html", "Candidates: accuracy against size")):
        figures = []
        for label, s in zip(labels, summaries, strict=True):
            body_html = _artifact(s.path, task, name)
            pictures = re.findall(r"<img [^>]*>", body_html)
            shown = "".join(pictures) or "<p class='muted'>not produced</p>"
            figures.append(f"<figure><figcaption>{_esc(label)}</figcaption>{shown}</figure>")
        parts.append(f"<h3>{_esc(title)}</h3><div class='pics'>{''.join(figures)}</div>")
    return _page(f"kftune: {len(summaries)} runs compared", *parts)


# ---------------------------------------------------------------- the command


def add_parser(commands) -> None:
    """``kftune runs``, ``kftune runs open`` and ``kftune runs compare``."""
    import argparse

    cmd = commands.add_parser(
        "runs", help="list past local runs; open a run's page; compare runs",
        description="Lists the local runs under --root, newest first: start, status, chosen candidate, its test "
                    "accuracy and gzip size, and the export. `kftune runs open [RUN]` prints the path of a run's page "
                    "(index.html) and opens it where a display exists; `kftune runs compare RUN RUN...` writes one "
                    "page and prints a table: the parameters that differ, then each stage's figures side by side. "
                    "RUN is a folder name under --root or a path.")
    cmd.add_argument("--root", default="runs", help="where the run folders are (default: runs)")
    actions = cmd.add_subparsers(dest="runs_command", metavar="{open,compare}")
    # --root after the action too; SUPPRESS keeps the value given before it.
    open_cmd = actions.add_parser("open", help="print the path of a run's page and open it",
                                  description="Prints the path of a run's page (index.html) and opens it in a browser "
                                              "when a display exists. RUN: the newest run when omitted.")
    open_cmd.add_argument("run", nargs="?", metavar="RUN")
    open_cmd.add_argument("--root", default=argparse.SUPPRESS, help="where the run folders are (default: runs)")
    compare_cmd = actions.add_parser("compare", help="compare runs: one page and a table",
                                     description="Writes one page comparing the runs and prints a table: the "
                                                 "parameters that differ, then each stage's figures side by side.")
    compare_cmd.add_argument("runs", nargs="+", metavar="RUN")
    compare_cmd.add_argument("--output", help="the page to write (default: <root>/compare.html)")
    compare_cmd.add_argument("--root", default=argparse.SUPPRESS, help="where the run folders are (default: runs)")


def command(args) -> int:
    """Runs ``kftune runs ...``; a mistake (a RUN that does not exist) raises InputError: exit 2."""
    root = Path(args.root)
    if args.runs_command == "open":
        if args.run:
            run_dir = resolve(args.run, root)
        else:
            found = list_runs(root)
            if not found:
                raise _input_error(f"no runs under {root}/: `kftune run-local` (or `make run`) makes one.")
            run_dir = found[0].path
        page = open_page(run_dir)
        print(page.resolve())
        _show(page)
        return 0
    if args.runs_command == "compare":
        if len(args.runs) < 2:
            raise _input_error("compare needs two runs or more: kftune runs compare RUN RUN...")
        run_dirs = [resolve(run, root) for run in args.runs]
        page, table = compare(run_dirs, args.output or root / "compare.html")
        print(table)
        print(f"\npage: {page}")
        return 0
    found = list_runs(root)
    if not found:
        print(f"kftune: no runs under {root}/", file=sys.stderr)
        return 0
    print(runs_table(found))
    return 0


def _show(page: Path) -> None:
    """Opens the page in a browser where there is a screen to show it on; on a headless machine the path is enough."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return
    import webbrowser

    try:
        webbrowser.open(page.resolve().as_uri())
    except webbrowser.Error:
        pass  # no browser registered: the printed path is the answer
