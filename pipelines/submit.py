"""``kftune submit``: the compiled pipeline onto a Kubeflow Pipelines cluster, as a run.

Everything goes through ``kfp.Client`` and the KFP v2 REST API it speaks: the
pipeline is uploaded (or a new version of it), the run is created in an
experiment from that version, and with ``--wait`` the run is polled until it
ends, with a progress line. kfp.Client's own wait never ends for a run that was
cancelled (it stops at SUCCEEDED, FAILED, SKIPPED or ERROR only); this one
treats CANCELED as the end it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kftune.errors import InputError, KftuneError

FINISHED = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")
TOKEN_ENV = "KFTUNE_KFP_TOKEN"
HEARTBEAT_SECONDS = 60


class Unreachable(KftuneError, ConnectionError):
    """No Kubeflow Pipelines API answers where kftune was told to look: exit code 1, not a mistake in the command."""


class RunFailed(RuntimeError):
    """The run ended in a state other than SUCCEEDED, or did not end in time."""


@dataclass
class Submission:
    compiled: Path
    arguments: dict
    host: str | None = None
    experiment: str = "kftune"
    pipeline_name: str = ""
    version: str = ""
    run_name: str = ""
    pipeline_root: str = ""
    service_account: str = ""
    namespace: str = ""
    description: str = field(default="kftune: search, fine-tune, prune, evaluate and export a Keras image classifier.")


def check_storage(pipeline_root: str, arguments: dict) -> None:
    """Steps hand the search state and the exports to each other through storage every pod can reach.

    kftune reads and writes gs:// and mounted paths, not KFP's default MinIO,
    so without a gs:// pipeline root both locations must be given.
    """
    if pipeline_root.startswith("gs://"):
        return
    missing = [name for name in ("search_state_uri", "export_destination") if not arguments.get(name)]
    if missing:
        raise InputError(
            f"the pipeline root is {pipeline_root or 'the cluster default'}, which kftune's steps cannot share: give "
            f"--pipeline-root gs://BUCKET/PREFIX, or {' and '.join(f'{n}=' for n in missing)} on gs:// or a mounted volume."
        )


def version_name(compiled: Path) -> str:
    """A name for the compiled YAML's content: the same YAML always gets the same version."""
    return "sha256-" + hashlib.sha256(compiled.read_bytes()).hexdigest()[:16]


def connect(host: str | None, namespace: str = ""):
    """A kfp.Client, or an InputError that says what to fix when nothing answers at ``host``."""
    import kfp
    import urllib3

    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
    printed = io.StringIO()
    try:
        # kfp.Client prints "Failed to load kube config." whenever no kubectl context is set, even with
        # --host given; without a host the error below says where it looked.
        with contextlib.redirect_stdout(printed):
            return kfp.Client(host=host or None, namespace=namespace or "kubeflow",
                              existing_token=os.environ.get(TOKEN_ENV) or None)
    except (urllib3.exceptions.HTTPError, TimeoutError) as e:
        where = f"`{host}`" if host else "the cluster of the current kubectl context"
        raise Unreachable(f"no Kubeflow Pipelines API answers at {where} ({type(e).__name__}): check --host, e.g. "
                         "http://localhost:8080 after `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`.") from None


def _find_version(client, pipeline_id: str, name: str):
    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}))
    return (found.pipeline_versions or [None])[0]


def upload(client, submission: Submission, out: Callable[[str], None] = print) -> tuple[str, str]:
    """Uploads the pipeline, or a new version of it; returns (pipeline id, version id)."""
    compiled, name = submission.compiled, submission.pipeline_name
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(str(compiled), pipeline_name=name, description=submission.description)
        # Kubeflow creates the first version with the pipeline; its id comes from the version list.
        first = client.list_pipeline_versions(pipeline.pipeline_id, page_size=1).pipeline_versions[0]
        out(f"kftune: uploaded pipeline `{name}` ({pipeline.pipeline_id}), version `{first.display_name}`")
        return pipeline.pipeline_id, first.pipeline_version_id
    version = submission.version or version_name(compiled)
    existing = _find_version(client, pipeline_id, version)
    if existing is not None:
        if submission.version:
            raise InputError(f"pipeline `{name}` already has a version `{version}`, and versions never change: "
                             "give a new --version, or leave it out to name the version after the YAML's content.")
        out(f"kftune: pipeline `{name}` already has this compiled YAML as version `{version}`; running it")
        return pipeline_id, existing.pipeline_version_id
    uploaded = client.upload_pipeline_version(str(compiled), version, pipeline_id=pipeline_id,
                                              description=submission.description)
    out(f"kftune: uploaded version `{version}` of pipeline `{name}` ({pipeline_id})")
    return pipeline_id, uploaded.pipeline_version_id


def start(client, submission: Submission, pipeline_id: str, version_id: str):
    """Creates the run in the experiment (created if missing); returns kfp's V2beta1Run."""
    experiment = client.create_experiment(submission.experiment, namespace=submission.namespace or None)
    run_name = submission.run_name or f"{submission.pipeline_name} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}"
    return client.run_pipeline(
        experiment_id=experiment.experiment_id, job_name=run_name, params=submission.arguments,
        pipeline_id=pipeline_id, version_id=version_id, pipeline_root=submission.pipeline_root or None,
        service_account=submission.service_account or None,
    )


def _progress(run) -> str:
    tasks = (run.run_details.task_details if run.run_details else None) or []
    done = sum(1 for t in tasks if t.state in ("SUCCEEDED", "SKIPPED"))
    running = sorted({t.display_name for t in tasks if t.state == "RUNNING" and t.pod_name})
    line = f"{run.state or 'PENDING'}, {done} task(s) done"
    return line + (f", running: {', '.join(running)}" if running else "")


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def wait(client, run_id: str, timeout: float = 0, poll: float = 10, out: Callable[[str], None] = print):
    """Polls the run until it ends; raises RunFailed unless it SUCCEEDED. 0 for no timeout."""
    started = last_print = time.monotonic()
    last = None
    while True:
        run = client.get_run(run_id)
        now = time.monotonic()
        line = _progress(run)
        if line != last or now - last_print >= HEARTBEAT_SECONDS:
            out(f"kftune: [{_elapsed(now - started)}] {line}")
            last, last_print = line, now
        if run.state in FINISHED:
            if run.state == "SUCCEEDED":
                return run
            failed = sorted({t.display_name for t in (run.run_details.task_details if run.run_details else None) or []
                             if t.state == "FAILED"})
            reason = run.error.message if run.error and run.error.message else ""
            detail = "; ".join(x for x in (f"failed: {', '.join(failed)}" if failed else "", reason) if x)
            raise RunFailed(f"run {run_id} {run.state} after {_elapsed(now - started)}" + (f" ({detail})" if detail else ""))
        if timeout and now - started > timeout:
            raise RunFailed(f"run {run_id} is still {run.state or 'PENDING'} after {_elapsed(timeout)}; "
                            "it goes on on the cluster (stop it in the Kubeflow UI if it should not).")
        time.sleep(poll)


def submit(submission: Submission, wait_for: bool = False, timeout: float = 0, poll: float = 10,
           out: Callable[[str], None] = print) -> int:
    """Upload, run, and optionally wait; the exit code: 0 done (or started), 1 the run failed."""
    import kfp_server_api
    import urllib3

    check_storage(submission.pipeline_root or _compiled_root(submission.compiled), submission.arguments)
    client = connect(submission.host, submission.namespace)
    try:
        pipeline_id, version_id = upload(client, submission, out)
        run = start(client, submission, pipeline_id, version_id)
        out(f"kftune: started run {run.run_id} in experiment `{submission.experiment}`")
        if wait_for:
            wait(client, run.run_id, timeout, poll, out)
            out(f"kftune: run {run.run_id} SUCCEEDED")
        return 0
    except kfp_server_api.ApiException as e:
        message = _api_message(e)
        if e.status and 400 <= e.status < 500:
            raise InputError(f"Kubeflow Pipelines refused the request (HTTP {e.status}): {message}") from None
        print(f"kftune: Kubeflow Pipelines failed (HTTP {e.status}): {message}", file=sys.stderr)
        return 1
    except RunFailed as e:
        print(f"kftune: {e}", file=sys.stderr)
        return 1
    except urllib3.exceptions.HTTPError as e:
        print(f"kftune: lost the connection to Kubeflow Pipelines: {e}", file=sys.stderr)
        return 1


def _compiled_root(compiled: Path) -> str:
    import yaml

    spec = next(yaml.safe_load_all(compiled.read_text()))
    return spec.get("defaultPipelineRoot", "")


def _api_message(e) -> str:
    try:
        body = json.loads(e.body or "{}")
        return body.get("message") or body.get("error") or e.reason
    except (ValueError, AttributeError):
        return str(e.body or e.reason).splitlines()[0]
