"""The deploy step: its InferenceService held to KServe's own models, applied through the real kubernetes client.

The manifests are walked against the generated models of the installed
``kserve`` package (``V1beta1InferenceService`` and down, with the kubernetes
client's models for containers, resources and probes) and built from them, so a
key KServe does not know, a value of the wrong type or a missing required field
fails the test. Applying and waiting run against tests/kube_server.py, a
Kubernetes API server on loopback (no cluster can run here).
"""

import copy
import dataclasses
import json
import re
from pathlib import Path

import kserve
import kubernetes.client
import pytest
import yaml
from kube_server import KubeServer

from kftune import deploy, parameters, storage
from kftune.errors import EXIT_DEPLOY, DeployError, InputError

IMAGE = "ghcr.io/kftune/kftune-cpu:0.1.0"
TF_METADATA = {"version": "3", "source_run": "kftune-tuning-2026-12-06", "serving": {
    "runtime": "tensorflow", "candidate": "finetuned", "model_file": "saved_model.pb"}}
TFLITE_METADATA = {"version": "4", "source_run": "kftune-tuning-2026-12-07", "serving": {
    "runtime": "kftune", "candidate": "quantized", "model_file": "model_int8.tflite"}}


# ---------------------------------------------------------------- KServe's own schema

_PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _model_class(name: str):
    cls = getattr(kserve, name, None) or getattr(kubernetes.client, name, None)
    if cls is None or not hasattr(cls, "openapi_types"):
        raise AssertionError(f"no generated model {name} in kserve or kubernetes.client")
    return cls


def build(value, type_name: str, where: str = "InferenceService"):
    """``value`` (plain YAML data) as KServe's generated model ``type_name``, refusing what the schema does not allow.

    Every key must be one of the model's ``attribute_map`` names, every value of
    its declared type; constructing each model runs its own checks (required
    fields). Returns the model object.
    """
    if type_name in _PRIMITIVES:
        kind = _PRIMITIVES[type_name]
        if isinstance(value, bool) and type_name != "bool" or not isinstance(value, kind):
            raise AssertionError(f"{where}: expected {type_name}, got {value!r}")
        return value
    if type_name == "object":  # int-or-string and free-form fields
        return value
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise AssertionError(f"{where}: expected a list, got {value!r}")
        return [build(v, type_name[5:-1], f"{where}[{i}]") for i, v in enumerate(value)]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            raise AssertionError(f"{where}: expected a mapping, got {value!r}")
        inner = type_name[5:-1].split(", ", 1)[1]
        return {k: build(v, inner, f"{where}.{k}") for k, v in value.items()}
    cls = _model_class(type_name)
    if not isinstance(value, dict):
        raise AssertionError(f"{where}: expected a {type_name} mapping, got {value!r}")
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json))
    if unknown:
        raise AssertionError(f"{where}: {type_name} has no field(s) {unknown}")
    kwargs = {by_json[k]: build(v, cls.openapi_types[by_json[k]], f"{where}.{k}") for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise AssertionError(f"{where}: {type_name}: {e}") from None


def check_inference_service(manifest: dict):
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    return build(manifest, "V1beta1InferenceService")


def _config(**fields) -> deploy.DeployConfig:
    return deploy.DeployConfig(**{"serving_name": "digits", "serving_namespace": "models", **fields})


# ---------------------------------------------------------------- the manifests


def test_the_tensorflow_runtime_serves_the_base_with_kserves_model_format():
    manifest = deploy.inference_service(_config(), "gs://bucket/models/3", TF_METADATA, IMAGE)
    isvc = check_inference_service(manifest)
    model = manifest["spec"]["predictor"]["model"]
    assert isvc.spec.predictor.model.model_format.name == "tensorflow"
    # TF Serving wants <base>/<N>/: the base is the storageUri, and the newest version there is served.
    assert model["storageUri"] == "gs://bucket/models" and model["runtimeVersion"] == deploy.TF_SERVING_VERSION
    assert "containers" not in manifest["spec"]["predictor"]
    assert model["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert not any("gpu" in key for kind in model["resources"].values() for key in kind)
    meta = manifest["metadata"]
    assert (meta["name"], meta["namespace"]) == ("digits", "models")
    assert meta["labels"]["kftune.io/version"] == "3" and meta["labels"]["app.kubernetes.io/managed-by"] == "kftune"
    assert meta["annotations"]["kftune.io/export"] == "gs://bucket/models/3"
    assert meta["annotations"]["kftune.io/candidate"] == "finetuned"
    assert meta["annotations"]["kftune.io/source-run"] == "kftune-tuning-2026-12-06"
    # The deployment mode is the cluster's choice; each version changes the predictor's pods, so a redeploy rolls.
    assert not any(k.startswith("serving.kserve.io/") for k in meta["annotations"])
    assert manifest["spec"]["predictor"]["annotations"] == {"kftune.io/version": "3"}
    assert "canaryTrafficPercent" not in manifest["spec"]["predictor"]


def test_a_tflite_candidate_is_served_by_kftunes_predictor_in_its_cpu_image():
    config = _config(serving_storage_uri="pvc://kftune-shared/exports")
    manifest = deploy.inference_service(config, "/mnt/kftune/exports/4", TFLITE_METADATA, IMAGE)
    isvc = check_inference_service(manifest)
    (container,) = manifest["spec"]["predictor"]["containers"]
    assert isvc.spec.predictor.containers[0].name == "kserve-container"
    assert container["image"] == IMAGE and container["command"] == ["kftune"]
    assert container["args"] == ["serve", "/mnt/models", "--port", "8080", "--name", "digits"]
    # The version (not the base) reaches the container as KServe hands a custom predictor its model.
    assert container["env"] == [{"name": "STORAGE_URI", "value": "pvc://kftune-shared/exports/4"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v1/models/digits", "port": 8080}
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    assert "model" not in manifest["spec"]["predictor"]


def test_a_canary_share_is_written_only_when_set():
    manifest = deploy.inference_service(_config(canary_traffic_percent=10), "gs://b/m/2", TF_METADATA, IMAGE)
    check_inference_service(manifest)
    assert manifest["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_the_stored_yaml_is_the_manifest_and_kubectl_reads_it_as_it_is():
    manifest = deploy.inference_service(_config(), "gs://bucket/models/3", TF_METADATA, IMAGE)
    text = deploy.manifest_yaml(manifest)
    assert text.startswith("# kftune: serves version 3 of gs://bucket/models with KServe.")
    assert yaml.safe_load(text) == manifest
    files = deploy.manifest_files(_config(), IMAGE)("gs://bucket/models/3", TF_METADATA)
    assert files == {"inferenceservice.yaml": text.encode()}
    assert deploy.manifest_files(deploy.DeployConfig(), IMAGE) is None


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m["spec"]["predictor"]["model"].update(storageURI=m["spec"]["predictor"]["model"].pop("storageUri")),
     r"V1beta1ModelSpec has no field\(s\) \['storageURI'\]"),
    (lambda m: m["spec"]["predictor"].update(minReplicas="1"), r"minReplicas: expected int"),
    (lambda m: m["spec"]["predictor"]["model"]["resources"].update(limit={"cpu": "1"}),
     r"V1ResourceRequirements has no field\(s\) \['limit'\]"),
    (lambda m: m["spec"]["predictor"].update(canaryTrafficPercent=True), r"canaryTrafficPercent: expected int"),
    (lambda m: m["spec"].update(predicter=m["spec"].pop("predictor")), r"has no field\(s\) \['predicter'\]"),
], ids=["misspelt-key", "wrong-type", "misspelt-nested-key", "bool-for-int", "misspelt-top-key"])
def test_the_schema_check_refuses_what_kserve_would_not_take(mutate, message):
    manifest = copy.deepcopy(deploy.inference_service(_config(), "gs://b/m/2", TF_METADATA, IMAGE))
    mutate(manifest)
    with pytest.raises(AssertionError, match=message):
        check_inference_service(manifest)


def test_the_schema_check_refuses_a_container_without_its_required_name():
    manifest = deploy.inference_service(_config(serving_storage_uri="gs://b/m"), "/x/4", TFLITE_METADATA, IMAGE)
    del manifest["spec"]["predictor"]["containers"][0]["name"]
    with pytest.raises(AssertionError, match=r"V1Container: Invalid value for `name`, must not be `None`"):
        check_inference_service(manifest)


def test_the_namespace_defaults_to_the_pods_own(tmp_path):
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("team-a\n")
    assert deploy.run_namespace(str(namespace_file)) == "team-a"
    manifest = deploy.inference_service(_config(serving_namespace=""), "gs://b/m/3", TF_METADATA, IMAGE,
                                        namespace=deploy.run_namespace(str(namespace_file)))
    assert manifest["metadata"]["namespace"] == "team-a"


# ---------------------------------------------------------------- bad settings: one line each


@pytest.mark.parametrize("fields, message", [
    ({"serving_name": "Digits_Model"}, r"`serving_name` must be a DNS-1035 label of at most 39 characters: .* "
                                       r"Received: serving_name='Digits_Model'"),
    ({"serving_name": "7digits"}, r"`serving_name` must be a DNS-1035 label .* Received: serving_name='7digits'"),
    ({"serving_name": "d" * 40}, r"`serving_name` must be a DNS-1035 label of at most 39 characters"),
    ({"serving_name": "digits-"}, r"Received: serving_name='digits-'"),
    ({"serving_namespace": "Team A"}, r"`serving_namespace` must be a Kubernetes namespace name"),
    ({"canary_traffic_percent": 101}, r"`canary_traffic_percent` must be 0 \(no canary\) to 100: .* "
                                      r"Received: canary_traffic_percent=101"),
    ({"canary_traffic_percent": -5}, r"`canary_traffic_percent` must be a whole number >= 0"),
    ({"canary_traffic_percent": 12.5}, r"`canary_traffic_percent` must be a whole number >= 0"),
    ({"serving_timeout": 0}, r"`serving_timeout` must be a whole number >= 1"),
    ({"serving_storage_uri": "/mnt/kftune/exports"}, r"`serving_storage_uri` must be a folder in one of KServe's "
                                                    r"storage schemes \(gs://, s3://, pvc://\)"),
    ({"serving_storage_uri": "pvc://"}, r"Received: serving_storage_uri='pvc://'"),
])
def test_a_bad_deploy_setting_is_refused_with_one_line_naming_it(fields, message):
    with pytest.raises(InputError, match=message) as refused:
        deploy.DeployConfig(**{"serving_name": "digits", **fields})
    assert "\n" not in str(refused.value)


def test_the_pipeline_parameters_check_where_the_inferenceservice_reads_the_export(tmp_path):
    with pytest.raises(InputError, match=r"`serving_name` is set but `export_destination` `/data/models` is a folder "
                                         r"in the step's pod, which an InferenceService cannot read: set "
                                         r"`serving_storage_uri`"):
        parameters.validate({"serving_name": "digits", "export_destination": "/data/models"})
    settings = parameters.validate({"serving_name": "digits", "export_destination": str(tmp_path / "exports"),
                                    "serving_storage_uri": "pvc://kftune-shared/exports"})
    lines = parameters.check_locations(settings)
    assert "serving: InferenceService digits will read the export from pvc://kftune-shared/exports" in lines
    assert json.loads(settings.stage_json("deploy"))["serving_name"] == "digits"
    assert parameters.validate({}).deploy == deploy.DeployConfig()  # nothing deployed by default


# ---------------------------------------------------------------- applying and waiting, through the real client


def _manifest(version: str = "3", **fields) -> dict:
    metadata = {**TF_METADATA, "version": version}
    return deploy.inference_service(_config(serving_namespace="kubeflow", **fields), f"gs://b/models/{version}",
                                    metadata, IMAGE)


def test_a_first_deploy_creates_the_inferenceservice_and_waits_until_ready():
    lines = []
    with KubeServer(ready_after=3) as server:
        result = deploy.apply(_manifest(), timeout=60, progress=lines.append, poll=0.01, client=server.client())
    assert result.ready and result.url == "http://digits-kubeflow.example.com"
    assert result.address == "http://digits-predictor.kubeflow.svc.cluster.local"
    (created,) = server.calls("POST")
    assert created.path == "/apis/serving.kserve.io/v1beta1/namespaces/kubeflow/inferenceservices"
    assert created.body == _manifest()
    assert [r.query.get("limit") for r in server.calls("GET")][:1] == ["1"]  # is KServe there at all?
    assert lines[0] == "deploy: created InferenceService kubeflow/digits; waiting up to 60 s for Ready"
    # One line per status read before Ready: no status yet, then Ready=False with KServe's reason.
    assert any("no status from KServe yet" in line for line in lines)
    assert any("Ready=False (MinimumReplicasUnavailable: Deployment does not have minimum availability.), "
               "model Loading" in line for line in lines), lines


def test_a_second_deploy_of_the_name_replaces_its_spec_and_does_not_take_the_old_ready_for_its_own():
    with KubeServer(stale_reads=2) as server:
        server.put(_manifest("3", canary_traffic_percent=0) | {
            "metadata": {**_manifest("3")["metadata"], "labels": {**_manifest("3")["metadata"]["labels"], "team": "a"}}})
        result = deploy.apply(_manifest("4"), timeout=60, progress=lambda _: None, poll=0.01, client=server.client())
        stored = server.objects[("kubeflow", "digits")].obj
    assert result.ready
    (replaced,) = server.calls("PUT")
    assert replaced.body["metadata"]["resourceVersion"] == "100" and not server.calls("POST")
    assert stored["metadata"]["generation"] == 2
    assert stored["spec"]["predictor"]["annotations"] == {"kftune.io/version": "4"}
    assert stored["metadata"]["labels"]["kftune.io/version"] == "4" and stored["metadata"]["labels"]["team"] == "a"
    # The two reads that still showed version 3's Ready were not taken for version 4's: it waited past them.
    assert len([r for r in server.calls("GET") if r.path.endswith("/digits")]) >= 2 + 1 + 3


def test_deploying_the_same_version_again_changes_nothing_and_is_ready_at_once():
    with KubeServer() as server:
        server.put(_manifest("3"))
        result = deploy.apply(_manifest("3"), timeout=60, progress=lambda _: None, poll=0.01, client=server.client())
    assert result.ready and server.objects[("kubeflow", "digits")].obj["metadata"]["generation"] == 1


def test_a_cluster_without_kserve_is_named_as_such():
    with KubeServer(kserve=False) as server, pytest.raises(DeployError) as refused:
        deploy.apply(_manifest(), timeout=5, poll=0.01, client=server.client())
    assert re.fullmatch(r"KServe is not installed on this cluster: the Kubernetes API has no "
                        r"inferenceservices\.serving\.kserve\.io \(404 on listing them in `kubeflow`\)\. Install KServe "
                        r"\(`make kind-up` does, pinned; https://kserve\.github\.io/website/\), then deploy again\.",
                        str(refused.value)), str(refused.value)
    assert not server.calls("POST")


@pytest.mark.parametrize("verb", ["list", "get", "create"])
def test_a_forbidden_service_account_is_told_the_verbs_and_the_kubectl_lines_that_grant_them(verb):
    with KubeServer(forbidden=(verb,)) as server, pytest.raises(DeployError) as refused:
        deploy.apply(_manifest(), timeout=5, poll=0.01, client=server.client())
    message = str(refused.value)
    assert message.startswith(f"`system:serviceaccount:kubeflow:pipeline-runner` may not {verb} "
                              "inferenceservices.serving.kserve.io in namespace `kubeflow` (403 Forbidden): grant it "
                              "get, list, create, update there"), message
    assert ("`kubectl create role kftune-deploy -n kubeflow --verb=get,list,create,update "
            "--resource=inferenceservices.serving.kserve.io && kubectl create rolebinding kftune-deploy -n kubeflow "
            "--role=kftune-deploy --serviceaccount=kubeflow:pipeline-runner`") in message
    assert "\n" not in message


def test_an_update_the_service_account_may_not_make_names_update():
    with KubeServer(forbidden=("update",)) as server, pytest.raises(DeployError, match=r"may not update "):
        server.put(_manifest("3"))
        deploy.apply(_manifest("4"), timeout=5, poll=0.01, client=server.client())


def test_a_model_that_never_becomes_ready_times_out_with_kserves_last_word():
    lines = []
    with KubeServer(never_ready=True) as server:
        result = deploy.apply(_manifest(), timeout=0.3, progress=lines.append, poll=0.01, client=server.client())
    assert not result.ready and not result.url
    assert result.message.startswith("InferenceService `kubeflow/digits` was not Ready after 0.3 s; its last status: "
                                     "Ready=False (MinimumReplicasUnavailable: Deployment does not have minimum "
                                     "availability.), model Loading. Raise serving_timeout"), result.message
    assert len(lines) >= 2


def test_a_model_that_fails_to_load_fails_at_once_with_kserves_reason():
    with KubeServer(fails_to_load=True) as server:
        result = deploy.apply(_manifest(), timeout=60, progress=lambda _: None, poll=0.01, client=server.client())
    assert not result.ready
    assert result.message == ("InferenceService `kubeflow/digits` cannot serve the model: BlockedByFailedLoad: "
                              "ModelLoadFailed: could not find a servable version under /mnt/models.")


def test_a_canary_on_a_raw_deployment_is_refused_before_anything_is_written():
    with KubeServer(deployment_mode="Standard") as server, pytest.raises(DeployError) as refused:
        server.put(_manifest("3"))
        deploy.apply(_manifest("4", canary_traffic_percent=10), timeout=5, poll=0.01, client=server.client())
    assert "canary_traffic_percent=10 cannot be honoured: InferenceService `kubeflow/digits` runs in KServe's " \
           "Standard mode, which ignores canaryTrafficPercent" in str(refused.value)
    assert not server.calls("PUT")


def test_a_canary_on_a_knative_deployment_is_written():
    with KubeServer(deployment_mode="Serverless") as server:
        server.put(_manifest("3"))
        result = deploy.apply(_manifest("4", canary_traffic_percent=10), timeout=60, progress=lambda _: None,
                              poll=0.01, client=server.client())
    assert result.ready and server.calls("PUT")[0].body["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_kserves_webhook_refusal_and_a_missing_namespace_are_one_line_each():
    with KubeServer(reject="the InferenceService \"digits\" is invalid") as server, pytest.raises(DeployError) as e:
        deploy.apply(_manifest(), timeout=5, poll=0.01, client=server.client())
    assert str(e.value).startswith("the cluster refused InferenceService `kubeflow/digits` (422): admission webhook")
    with KubeServer(namespaces=()) as server, pytest.raises(DeployError) as e:
        deploy.apply(_manifest(), timeout=5, poll=0.01, client=server.client())
    assert str(e.value) == ("cannot create InferenceService `digits`: namespaces \"kubeflow\" not found (404): create "
                            "namespace `kubeflow` or set `serving_namespace` to one that exists.")


def test_an_api_server_that_does_not_answer_is_named():
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard: nothing listens
    configuration.retries = 0
    with pytest.raises(DeployError, match=r"the Kubernetes API at http://127\.0\.0\.1:9 did not answer"):
        deploy.apply(_manifest(), timeout=5, poll=0.01, client=client.ApiClient(configuration))


# ---------------------------------------------------------------- the step: the version's own manifest


def _version(tmp_path: Path, manifest: dict | None) -> str:
    """A published version (with its MANIFEST.json) holding ``manifest`` as inferenceservice.yaml."""
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "metadata.json").write_text(json.dumps(TF_METADATA))
    if manifest is not None:
        (staging / deploy.MANIFEST_FILE).write_text(deploy.manifest_yaml(manifest))
    uri = str(tmp_path / "exports" / "3")
    storage.publish_dir(staging, uri, manifest=True)
    return uri


def test_the_step_applies_the_manifest_stored_in_the_version_and_reports_it(tmp_path):
    manifest = _manifest()
    uri = _version(tmp_path, manifest)
    with KubeServer() as server:
        done = deploy.deploy_version(uri, _config(), progress=lambda _: None, poll=0.01, client=server.client())
    done.check()
    assert server.calls("POST")[0].body == manifest
    assert done.manifest_text == Path(uri, deploy.MANIFEST_FILE).read_text()
    report = done.markdown()
    assert report.startswith("## Serving `digits`: Ready\n")
    assert "| URL | `http://digits-kubeflow.example.com` |" in report
    assert "kubectl port-forward -n kubeflow svc/digits-predictor 8080:80 &" in report
    assert "curl -s http://localhost:8080/v1/models/digits:predict" in report
    assert "```yaml\n# kftune: serves version 3" in report
    # Narrow enough for the Run UI's 800 px side pane outside the manifest's own block.
    prose = report.split("```yaml")[0]
    assert max(len(line) for line in prose.splitlines()) <= 100


def test_a_deploy_that_is_not_ready_fails_the_step_and_leaves_the_export_as_it_was(tmp_path):
    uri = _version(tmp_path, _manifest())
    before = storage.verify_version(uri)
    with KubeServer(never_ready=True) as server:
        done = deploy.deploy_version(uri, _config(serving_timeout=1), progress=lambda _: None, poll=0.01,
                                     client=server.client())
    assert "NOT ready" in done.markdown()
    with pytest.raises(DeployError, match=r"was not Ready after 1 s; .* The export `.*exports/3` is stored and "
                                          r"unchanged: deploy it again by hand with `kubectl apply -f "
                                          r"inferenceservice\.yaml` from it\."):
        done.check()
    assert storage.verify_version(uri) == before


def test_a_version_without_an_inferenceservice_is_refused_before_the_cluster_is_asked(tmp_path):
    uri = _version(tmp_path, None)
    with KubeServer() as server, pytest.raises(InputError, match=r"holds no inferenceservice\.yaml: it was exported "
                                                                  r"with serving_name empty"):
        deploy.deploy_version(uri, _config(), client=server.client())
    assert not server.requests


def test_a_version_changed_after_its_export_is_not_deployed(tmp_path):
    uri = _version(tmp_path, _manifest())
    Path(uri, deploy.MANIFEST_FILE).write_text(Path(uri, deploy.MANIFEST_FILE).read_text().replace("digits", "other"))
    with KubeServer() as server, pytest.raises(InputError, match=r"does not match its MANIFEST\.json"):
        deploy.deploy_version(uri, _config(), client=server.client())
    assert not server.requests


def _component_arguments(tmp_path: Path, uri: str, **fields) -> dict:
    from kfp.dsl import Artifact, Markdown

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return dict(exported_uri=uri, config=json.dumps(dataclasses.asdict(_config(**fields))),
                report=Markdown(uri=str(out / "report.md")), manifest=Artifact(uri=str(out / "manifest.yaml")))


def test_the_component_deploys_as_the_kubeconfigs_user_and_writes_its_report(tmp_path, monkeypatch, capsys):
    from components.deploy import deploy as component

    uri = _version(tmp_path, _manifest())
    with KubeServer() as server:
        (tmp_path / "kubeconfig").write_text(server.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        arguments = _component_arguments(tmp_path, uri)
        monkeypatch.setenv(deploy.POLL_ENV, "0.01")
        component.python_func(**arguments)
    assert "## Serving `digits`: Ready" in Path(arguments["report"].path).read_text()
    assert Path(arguments["manifest"].path).read_text() == Path(uri, deploy.MANIFEST_FILE).read_text()
    assert "deploy: Ready after" in capsys.readouterr().out


def test_the_component_exits_non_zero_with_one_line_when_the_model_is_not_ready(tmp_path, monkeypatch, capsys):
    from components.deploy import deploy as component

    uri = _version(tmp_path, _manifest())
    with KubeServer(never_ready=True) as server:
        (tmp_path / "kubeconfig").write_text(server.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv(deploy.POLL_ENV, "0.01")
        arguments = _component_arguments(tmp_path, uri, serving_timeout=1)
        with pytest.raises(SystemExit) as stopped:
            component.python_func(**arguments)
    assert stopped.value.code == EXIT_DEPLOY
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kftune:")]
    assert len(lines) == 1 and lines[0].startswith("kftune: deploy error: InferenceService `kubeflow/digits` was not "
                                                   "Ready after 1 s"), lines
    assert "NOT ready" in Path(arguments["report"].path).read_text()


# ---------------------------------------------------------------- the pipeline: gate, export, then deploy


@pytest.fixture(scope="module")
def small_model_dir(digits_dir, tmp_path_factory):
    """A small real model for the digits, saved as the steps save models."""
    import tensorflow as tf

    from kftune import dataset, models

    info = dataset.DatasetInfo.load(digits_dir)
    tf.keras.utils.set_random_seed(0)
    model = models.small_cnn(info.shape, info.num_classes, filters=4, num_layers=1, dense_units=8)
    return models.save(model, tmp_path_factory.mktemp("chosen"), models.ModelMeta(
        family="small_cnn", class_names=info.class_names, input_shape=list(info.shape), stage="baseline"))


@pytest.mark.filterwarnings("ignore:.*non-Python base image")  # the image's packages are this venv's
def test_kfp_runs_the_deploy_step_after_the_export_only_with_serving_name_set(
        small_model_dir, digits_dir, tmp_path, monkeypatch):
    """The pipeline's nested `publish` pipeline as the pipeline wires it (evaluate, the gate's If, export, the nested
    If, deploy), run by KFP's local runner; the deploy step's process talks to the loopback API server through
    the kubeconfig, as it would to a cluster from outside one."""
    from kfp import dsl, local
    from kfp.dsl import Dataset, Model

    from pipelines.tuning_pipeline import _publish

    publish = dsl.pipeline(name="publish", description=_publish.__doc__)(_publish)
    destination = tmp_path / "exports"

    @dsl.pipeline
    def gate_export_deploy(serving: str) -> str:
        model = dsl.importer(artifact_uri=str(small_model_dir), artifact_class=Model).output
        data = dsl.importer(artifact_uri=str(digits_dir), artifact_class=Dataset).output
        published = publish(dataset=data, baseline=model, finetuned=model, pruned=model,
                            gate_config=json.dumps({"min_accuracy": 0.0, "max_accuracy_drop": 0.01, "max_size_bytes": 0}),
                            export_config=json.dumps({"export_destination": str(destination), "export_version": ""}),
                            deploy_config=serving)
        return published.outputs["exported_uri"]

    with KubeServer(ready_after=2) as server:
        (tmp_path / "kubeconfig").write_text(server.kubeconfig(namespace="kubeflow"))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv(deploy.POLL_ENV, "0.05")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "runs"),
                   raise_on_error=True)
        # serving_namespace empty: the kubeconfig context's namespace, as a pod's own in a cluster.
        settings = deploy.DeployConfig(serving_name="digits", serving_storage_uri="pvc://kftune-shared/exports")
        served = gate_export_deploy(serving=json.dumps(dataclasses.asdict(settings)))
        skipped = gate_export_deploy(serving=json.dumps(dataclasses.asdict(deploy.DeployConfig())))

    assert served.output == str(destination / "1") and skipped.output == str(destination / "2")
    # The version holds its InferenceService, covered by its manifest; that file is what was applied.
    stored = Path(served.output, deploy.MANIFEST_FILE).read_text()
    assert deploy.MANIFEST_FILE in storage.verify_version(served.output)
    (created,) = server.calls("POST")
    assert created.body == yaml.safe_load(stored)
    check_inference_service(created.body)
    assert created.body["metadata"]["namespace"] == "kubeflow"
    assert created.body["spec"]["predictor"]["model"]["storageUri"] == "pvc://kftune-shared/exports"
    report = next((tmp_path / "runs").glob("gate-export-deploy-*/deploy/report")).read_text()
    assert "## Serving `digits`: Ready" in report and "http://digits-kubeflow.example.com" in report
    # Without serving_name: no manifest in the version, and no deploy task.
    assert not Path(skipped.output, deploy.MANIFEST_FILE).exists()
    assert len(list((tmp_path / "runs").glob("gate-export-deploy-*/deploy"))) == 1
