"""``kftune submit`` against a Kubeflow Pipelines REST server on loopback (tests/kfp_server.py)."""

import socket

import pytest
from kfp.client import Client
from kfp_server import KfpServer

from pipelines import cli, submit

GS_ROOT = ["--pipeline-root", "gs://bucket/kftune"]
FAST = ["--poll", "0.01"]


@pytest.fixture(autouse=True)
def _isolated_client(tmp_path, monkeypatch):
    # kfp.Client reads (and on multi-user clusters writes) a per-user context file.
    monkeypatch.setattr(Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    monkeypatch.delenv(submit.TOKEN_ENV, raising=False)


def kftune(*args: str) -> int:
    return cli.main(["submit", *args])


def test_a_first_submit_uploads_the_pipeline_creates_the_experiment_and_waits_for_success(capsys):
    with KfpServer(run_states=["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]) as server:
        code = kftune("--host", server.url, "max_trials=4", "source=gs://data/flowers", *GS_ROOT, "--wait", *FAST,
                      "--run-name", "ci-42", "--service-account", "kftune-runner")
    out = capsys.readouterr().out
    assert code == 0, out
    (upload,) = server.calls("POST", "/pipelines/upload")
    assert upload.query["name"] == "kftune-tuning"
    assert upload.files["uploadfile"] == cli.COMPILED.read_bytes()
    assert not server.calls("POST", "/pipelines/upload_version")
    (experiment,) = server.calls("POST", "/experiments")
    assert experiment.body["display_name"] == "kftune"
    (created,) = server.calls("POST", "/runs")
    (pipeline_id,) = server.pipelines
    (version,) = server.versions[pipeline_id]
    (experiment_id,) = server.experiments
    assert created.body == {
        "experiment_id": experiment_id,
        "display_name": "ci-42",
        "pipeline_version_reference": {"pipeline_id": pipeline_id, "pipeline_version_id": version["pipeline_version_id"]},
        "runtime_config": {"pipeline_root": "gs://bucket/kftune",
                           "parameters": {"max_trials": 4, "source": "gs://data/flowers"}},
        "service_account": "kftune-runner",
    }
    (run_id,) = server.runs
    assert len(server.calls("GET", f"/runs/{run_id}")) == 4
    progress = [line for line in out.splitlines() if line.startswith("kftune: [")]
    assert [line.split("] ", 1)[1] for line in progress] == [
        "PENDING, 1 task(s) done", "RUNNING, 1 task(s) done, running: fine-tune", "SUCCEEDED, 1 task(s) done"]
    assert out.rstrip().endswith(f"kftune: run {run_id} SUCCEEDED")


def test_a_changed_pipeline_becomes_a_new_version_and_an_unchanged_one_reuses_it(capsys):
    with KfpServer() as server:
        pipeline_id = server.add_pipeline("kftune-tuning", versions=("kftune-tuning",))
        server.add_experiment("kftune")
        assert kftune("--host", server.url, *GS_ROOT) == 0
        assert kftune("--host", server.url, *GS_ROOT) == 0
    (upload,) = server.calls("POST", "/pipelines/upload_version")
    assert upload.query == {"name": submit.version_name(cli.COMPILED), "pipelineid": pipeline_id,
                            "description": submission_description()}
    assert upload.files["uploadfile"] == cli.COMPILED.read_bytes()
    assert not server.calls("POST", "/pipelines/upload") and not server.calls("POST", "/experiments")
    new_version = server.versions[pipeline_id][0]["pipeline_version_id"]
    runs = server.calls("POST", "/runs")
    assert [r.body["pipeline_version_reference"]["pipeline_version_id"] for r in runs] == [new_version, new_version]
    assert not [r for r in server.requests if r.path.startswith("/apis/v2beta1/runs/")], "waited without --wait"
    assert "already has this compiled YAML as version" in capsys.readouterr().out


def submission_description() -> str:
    return submit.Submission(compiled=cli.COMPILED, arguments={}).description


@pytest.mark.parametrize("state", ["FAILED", "CANCELED"])
def test_waiting_ends_with_exit_1_when_the_run_fails_or_is_canceled(state, capsys):
    with KfpServer(run_states=["RUNNING", state], run_error="fine-tune: OOMKilled") as server:
        code = kftune("--host", server.url, *GS_ROOT, "--wait", "--timeout", "5", *FAST)
    err = capsys.readouterr().err.strip().splitlines()
    (run_id,) = server.runs
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"kftune: run {run_id} {state} after ")
    if state == "FAILED":
        assert "failed: fine-tune; fine-tune: OOMKilled" in err[0]
    assert len(server.calls("GET", f"/runs/{run_id}")) == 2


def test_waiting_gives_up_after_the_timeout_and_says_the_run_goes_on(capsys):
    with KfpServer(run_states=["RUNNING"]) as server:
        code = kftune("--host", server.url, *GS_ROOT, "--wait", "--timeout", "0.05", *FAST)
    err = capsys.readouterr().err
    assert code == 1 and "is still RUNNING after" in err and "goes on on the cluster" in err


def test_an_existing_version_name_is_refused_before_any_run(capsys):
    with KfpServer() as server:
        server.add_pipeline("kftune-tuning", versions=("kftune-tuning", "release-1"))
        code = kftune("--host", server.url, *GS_ROOT, "--version", "release-1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "already has a version `release-1`" in err[0], err
    assert not server.calls("POST", "/runs") and not server.calls("POST", "/pipelines/upload_version")


@pytest.mark.parametrize("args, message", [
    (["max_trails=3", *GS_ROOT], "unknown pipeline parameter `max_trails`"),
    (["target_sparsity=1.0", *GS_ROOT], "target_sparsity"),
    ([], "give --pipeline-root gs://BUCKET/PREFIX, or search_state_uri= and export_destination="),
    (["--pipeline-root", "/tmp/runs"], "--pipeline-root must be a gs://, s3:// or minio:// URI"),
    (["--compiled", "no/such.yaml", *GS_ROOT], "`no/such.yaml` does not exist"),
    (["export_destination=s3://bucket/models", *GS_ROOT], "`export_destination` uses s3://"),
    (["max_trials=8", "parallel_trials=9", *GS_ROOT], "`parallel_trials`=9 is more than `max_trials`=8"),
])
def test_mistakes_stop_before_any_request_with_one_line(args, message, capsys):
    with KfpServer() as server:
        code = kftune("--host", server.url, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert server.requests == []


def test_storage_on_a_mounted_volume_is_enough_without_a_gs_pipeline_root(capsys):
    with KfpServer() as server:
        # A source on the volume the pods mount need not exist here: the validation step checks it there.
        code = kftune("--host", server.url, "search_state_uri=/mnt/kftune/search", "export_destination=/mnt/kftune/out",
                      "source=/mnt/kftune/data/flowers")
    assert code == 0, capsys.readouterr().err
    (created,) = server.calls("POST", "/runs")
    assert "pipeline_root" not in created.body["runtime_config"]


def test_nothing_listening_at_the_host_is_one_line_that_says_what_to_check(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = kftune("--host", f"http://127.0.0.1:{port}", *GS_ROOT)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    # 1: the service could not be reached (2 is kept for a mistake in the command); nothing else printed.
    assert code == 1 and len(err) == 1, err
    assert "kube config" not in captured.out, captured.out
    assert f"no Kubeflow Pipelines API answers at `http://127.0.0.1:{port}`" in err[0] and "check --host" in err[0]
