"""``kftune reproduce EXPORT_URI``: run the pipeline again with the parameters an export recorded, and compare.

An export's metadata.json holds every pipeline parameter of the run that made
it, the fingerprint of the data it was trained on, every candidate's test
figures and the code version. Reproducing it:

1. checks the data first: ingests ``source`` again with the recorded ingest
   parameters and compares the fingerprint (one line, exit 2, when the data
   changed: the figures could not be compared);
2. runs the same compiled pipeline locally with those parameters, except what
   would make the rerun something else: a fresh search state and checkpoints
   (the recorded ones would resume the old run instead of repeating it), no
   deploy, and the export goes to its own base (``runs/reproduced`` unless
   given), never the original one, which a model server may be polling;
3. compares each candidate's new test figures with the recorded ones.

The same seed, code and machine give the same figures; elsewhere (another CPU,
a GPU, other library builds) floating-point sums differ in their last bits and
training drifts, so accuracy may differ within ``tolerance`` (default 2 points).
Exit 0 when every candidate's accuracy is within it and the same candidate is
chosen, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

# What a rerun must not take from the recorded run (see the module docstring).
FRESH = {"search_state_uri": "", "checkpoint_uri": "", "serving_name": "", "export_version": ""}
DEFAULT_DESTINATION = "runs/reproduced"
DEFAULT_TOLERANCE = 0.02


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One candidate's recorded and new test figures."""

    candidate: str
    recorded_accuracy: float | None
    new_accuracy: float | None
    recorded_gzip_bytes: int | None
    new_gzip_bytes: int | None

    def within(self, tolerance: float) -> bool:
        if self.recorded_accuracy is None or self.new_accuracy is None:
            return False
        return abs(self.new_accuracy - self.recorded_accuracy) <= tolerance + 1e-12


def recorded(export_uri: str, workdir: str | Path) -> dict:
    """The metadata.json of the version ``export_uri`` names (a version or a base), verified against its manifest."""
    from kftune import export
    from kftune.errors import InputError

    metadata = export.read_metadata(export.read_version(export.resolve(export_uri), workdir))
    if not metadata.get("parameters"):
        raise InputError(f"`{export_uri}` was exported before kftune recorded a run's parameters (its metadata.json "
                         "has none): it cannot be reproduced; export it again with this kftune.")
    return metadata


def check_data(metadata: dict, workdir: str | Path) -> str:
    """Ingests the recorded source again and returns its fingerprint, refusing data that changed since the export."""
    from kftune import dataset, parameters
    from kftune.errors import InputError

    settings = parameters.validate(metadata["parameters"])
    fingerprint = dataset.ingest(settings.ingest, Path(workdir, "data"), progress=lambda _: None).fingerprint
    if fingerprint != metadata.get("data_fingerprint"):
        raise InputError(
            f"the data at `{settings.ingest.source}` changed since version {metadata.get('version')} was exported "
            f"(fingerprint {str(metadata.get('data_fingerprint'))[:12]}..., now {fingerprint[:12]}...): a rerun would "
            "not repeat it. Restore the data, or train on the new data with `kftune run-local`.")
    return fingerprint


def arguments(metadata: dict, export_destination: str) -> dict:
    """The recorded parameters, with what a rerun must not share with the original run replaced."""
    return {**metadata["parameters"], **FRESH, "export_destination": export_destination}


def compare(metadata: dict, run_dir: Path) -> tuple[list[Comparison], str]:
    """Each candidate's recorded figures beside the rerun's, and the candidate the rerun chose."""
    new = {}
    for path in run_dir.glob("evaluate*/evaluations"):
        new.update({values["name"]: values for values in json.loads(path.read_text())})
    chosen = ""
    for out in run_dir.glob("evaluate*/executor_output.json"):
        artifacts = json.loads(out.read_text()).get("artifacts", {})
        chosen = artifacts.get("chosen", {}).get("artifacts", [{}])[0].get("metadata", {}).get("candidate", "")
    old = {values["name"]: values for values in metadata.get("evaluations") or []}
    rows = [Comparison(name, (old.get(name) or {}).get("accuracy"), (new.get(name) or {}).get("accuracy"),
                       (old.get(name) or {}).get("gzip_bytes"), (new.get(name) or {}).get("gzip_bytes"))
            for name in [*old, *(n for n in new if n not in old)]]
    return rows, chosen


def table(rows: list[Comparison], recorded_choice: str, new_choice: str, tolerance: float) -> str:
    from kftune import report

    def accuracy(value):
        return "" if value is None else f"{value:.4f}"

    def kib(value):
        return "" if value is None else f"{value / 1024:.0f} KiB"

    lines = [[r.candidate, accuracy(r.recorded_accuracy), accuracy(r.new_accuracy),
              "" if not r.within(1.0) else f"{100 * (r.new_accuracy - r.recorded_accuracy):+.2f}",
              kib(r.recorded_gzip_bytes), kib(r.new_gzip_bytes),
              "same" if r.new_accuracy == r.recorded_accuracy else "within" if r.within(tolerance) else "DIFFERS"]
             for r in rows]
    text = report.text_table(["candidate", "recorded accuracy", "new accuracy", "points", "recorded gzip", "new gzip",
                              f"within {100 * tolerance:g} points"], lines)
    return text + f"\nchosen: recorded {recorded_choice}, rerun {new_choice or '(none)'}"


def reproduce(export_uri: str, *, pipeline_root: str = "runs", export_destination: str = DEFAULT_DESTINATION,
              tolerance: float = DEFAULT_TOLERANCE, compiled=None, verbose: bool = False) -> int:
    """Runs the pipeline again as the export at ``export_uri`` recorded it; returns the exit code (0 agree, 1 differ)."""
    from kftune.errors import InputError
    from pipelines import cli

    if not 0 <= tolerance <= 1:
        raise InputError(f"--tolerance must be between 0 and 1 (accuracy units; 0.02 is 2 points). Received: {tolerance}")
    with tempfile.TemporaryDirectory(prefix="kftune-reproduce-") as workdir:
        metadata = recorded(export_uri, workdir)
        print(f"kftune: reproducing version {metadata.get('version')} of run {metadata.get('source_run')} "
              f"(code {json.dumps(metadata.get('code_version') or {})})", flush=True)
        check_data(metadata, workdir)
    print("kftune: the data's fingerprint matches the export's; running the pipeline with its parameters", flush=True)
    rerun = arguments(metadata, export_destination)
    compiled = compiled or cli.COMPILED
    cli.check_arguments(rerun, compiled)
    run_dir, _ = cli.run_local(rerun, pipeline_root, compiled, verbose=verbose)
    rows, chosen = compare(metadata, Path(run_dir))
    print(table(rows, str(metadata.get("candidate")), chosen, tolerance))
    agree = all(r.within(tolerance) for r in rows) and chosen == metadata.get("candidate")
    print(f"kftune: {'reproduced' if agree else 'NOT reproduced'}: run folder {run_dir}")
    return 0 if agree else 1
