"""The cluster path, read from what a cluster gets: the compiled YAML of each profile, the images, the kind targets."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from kfp import compiler
from packaging.requirements import Requirement

from kftune.errors import InputError
from pipelines import cli, cluster

ROOT = Path(__file__).resolve().parents[1]
GPU_STEPS = {"search_worker", "search_result", "finetune", "prune"}
# Retried for preemption; not the search worker, whose retries the backend ignores inside a ParallelFor (#13897).
RETRIED_STEPS = {"search_result", "finetune", "prune"}
CACHED_STEPS = {"ingest", "augment", "evaluate"}
CPU_IMAGE_STEPS = {"validate", "ingest", "augment", "evaluate", "export", "deploy", "gate_failed"}
# The newest Kubeflow Pipelines backend release of kfp 2.17's line (kubeflow/pipelines tag 2.17.0).
KFP_BACKEND_RELEASE = "2.17.0"
# kserve/kserve's newest release tag in its repository (v0.20.0), and the cert-manager its quick install pins.
KSERVE_RELEASE, CERT_MANAGER_RELEASE = "v0.20.0", "v1.17.0"
GKE_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GKE_RETRY = {"maxRetryCount": 3, "backoffDuration": "60s", "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}
# Planted in the compiling process's environment: none of it may reach a compiled YAML.
PLANTED = {
    "GOOGLE_APPLICATION_CREDENTIALS_JSON": '{"private_key": "-----BEGIN PRIVATE KEY-----planted"}',
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-0123456789",
    "KFTUNE_KFP_TOKEN": "ya29.planted-token",
}
SECRET_PATTERNS = [r"-----BEGIN [A-Z ]*PRIVATE KEY", r"private_key", r"AKIA[0-9A-Z]{16}", r"ya29\.", r"planted"]

CUSTOM = """
extends: gke-gpu
pipeline_root: gs://my-bucket/kftune
credentials: {secret: gcs-key}
image_pull_secrets: [regcred]
defaults:
  env: {TF_CPP_MIN_LOG_LEVEL: "1"}
steps:
  search_worker: &l4
    node_selector: {cloud.google.com/gke-accelerator: nvidia-l4}
  search_result: *l4
  finetune: {<<: *l4, accelerator: {type: nvidia.com/gpu, count: 2}}
  prune: *l4
"""


def step_of(executor: str) -> str:
    return re.sub(r"-\d+$", "", executor.removeprefix("exec-")).replace("-", "_")


def read(text: str):
    """The pipeline spec, its executors, the kubernetes settings per executor, and (task, executor) pairs."""
    docs = list(yaml.safe_load_all(text))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    tasks = [(task, spec["components"][task["componentRef"]["name"]]["executorLabel"])
             for dag in dags for task in dag["tasks"].values()
             if "executorLabel" in spec["components"][task["componentRef"]["name"]]]
    return docs, spec["deploymentSpec"]["executors"], platform, tasks


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every shipped profile and a custom one, compiled with secrets planted in the environment."""
    folder = tmp_path_factory.mktemp("compiled")
    (folder / "custom.yaml").write_text(CUSTOM)
    with pytest.MonkeyPatch.context() as env:
        for name, value in PLANTED.items():
            env.setenv(name, value)
        return {profile: cli.compile_pipeline(folder / f"{profile}.out.yaml", profile).read_text()
                for profile in [*cluster.shipped(), str(folder / "custom.yaml")]}


def custom(compiled):
    return next(text for name, text in compiled.items() if name.endswith("custom.yaml"))


def test_the_shipped_profiles_are_gke_gpu_and_cpu():
    assert cluster.shipped() == ["cpu", "gke-gpu"] and cluster.DEFAULT_PROFILE == "gke-gpu"


def test_gke_gpu_puts_the_training_steps_on_the_gpu_pool_and_the_rest_beside_it(compiled):
    docs, executors, platform, tasks = read(compiled["gke-gpu"])
    assert len(docs) == 2 and set(platform) == set(executors)
    assert {step_of(e) for e in executors} == GPU_STEPS | CPU_IMAGE_STEPS == set(cluster.STEPS)
    for name, executor in executors.items():
        step, resources, k8s = step_of(name), executor["container"]["resources"], platform[name]
        assert {"resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"} <= set(resources), name
        assert k8s["securityContext"] == {"runAsNonRoot": True, "runAsUser": "1000"}, name
        if step in GPU_STEPS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert resources["accelerator"]["resourceCount"] == "1", name
            assert k8s["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}}, name
            assert k8s["tolerations"] == [GKE_TOLERATION], name
            assert resources["resourceMemoryLimit"] == "24Gi" and resources["resourceCpuRequest"] == "4", name
        else:
            assert "accelerator" not in resources and "nodeSelector" not in k8s and "tolerations" not in k8s, name
    for task, executor in tasks:
        step = step_of(executor)
        assert task.get("retryPolicy") == (GKE_RETRY if step in RETRIED_STEPS else None), step
        assert task["cachingOptions"].get("enableCache", False) == (step in CACHED_STEPS), step


def test_cpu_profile_asks_for_no_gpu_node_pool_or_retries(compiled):
    docs, executors, platform, tasks = read(compiled["cpu"])
    assert len(docs) == 2
    for name, executor in executors.items():
        resources, k8s = executor["container"]["resources"], platform[name]
        assert "accelerator" not in resources, name
        assert {"resourceCpuRequest", "resourceMemoryLimit"} <= set(resources), name
        assert set(k8s) == {"securityContext"}, name
    assert executors["exec-finetune"]["container"]["resources"]["resourceMemoryLimit"] == "8Gi"
    for task, executor in tasks:
        assert "retryPolicy" not in task, executor
        assert task["cachingOptions"].get("enableCache", False) == (step_of(executor) in CACHED_STEPS), executor


def test_a_custom_profile_extends_gke_gpu_and_mounts_its_credentials_by_reference(compiled):
    docs, executors, platform, tasks = read(custom(compiled))
    assert docs[0]["defaultPipelineRoot"] == "gs://my-bucket/kftune"
    for name, executor in executors.items():
        container, k8s = executor["container"], platform[name]
        assert k8s["secretAsVolume"] == [{"secretName": "gcs-key", "secretNameParameter": {"runtimeValue": {
            "constant": "gcs-key"}}, "mountPath": "/var/secrets/google", "optional": False}], name
        assert {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"} in container["env"]
        assert {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "1"} in container["env"], name
        assert k8s["imagePullSecret"] == [{"secretName": "regcred", "secretNameParameter": {"runtimeValue": {
            "constant": "regcred"}}}], name
        if step_of(name) in GPU_STEPS:
            assert k8s["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}, name
            assert k8s["tolerations"] == [GKE_TOLERATION], name
    assert executors["exec-finetune"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert executors["exec-prune"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert all(task.get("retryPolicy") == GKE_RETRY for task, e in tasks if step_of(e) in RETRIED_STEPS)


def test_no_compiled_yaml_holds_a_secret_value(compiled):
    texts = {**compiled, "checked in": cli.COMPILED.read_text()}
    for name, text in texts.items():
        for value in PLANTED.values():
            assert value not in text, name
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text), f"{name} matches {pattern}"


def test_the_imported_pipeline_carries_the_default_profile(tmp_path):
    from pipelines.tuning_pipeline import tuning_pipeline

    compiler.Compiler().compile(tuning_pipeline, str(tmp_path / "imported.yaml"))
    default = cli.compile_pipeline(tmp_path / "default.yaml", cluster.DEFAULT_PROFILE)
    assert (tmp_path / "imported.yaml").read_text() == default.read_text()


@pytest.mark.parametrize("profile, message", [
    ("nope", "cluster profile `nope` not found: give one of cpu, gke-gpu"),
    ("nodes: 3", "unknown key(s) nodes"),
    ("defaults: {gpus: 1}", "`defaults` has unknown key(s) gpus"),
    ("steps: {finetune: {accelerator: {count: 1}}}", "`accelerator` needs a `type`"),
    ("steps: {finetune: {retry: {backoff: 60s}}}", "`retry` needs `max_retries`"),
    ("defaults: {env: {HF_TOKEN: abc}}", "env `HF_TOKEN` looks like a credential"),
    ("pipeline_root: /tmp/root", "`pipeline_root` must start with gs://"),
    ("extends: cpu\nsteps: {finetun: {caching: true}}", "sets step `finetun`, which the pipeline does not have"),
    ("steps: {finetune: {image: tpu}}", "`image` must be gpu"),
    ("steps: {prune: {resources: {limits: {memory: lots}}}}", "step `prune`: Invalid memory string"),
    ("extends: self.yaml", "extends itself"),
])
def test_a_bad_profile_stops_compile_with_one_line_naming_it(profile, message, tmp_path, capsys):
    path = tmp_path / "self.yaml"
    path.write_text(profile)
    code = cli.main(["compile", "--profile", "nope" if profile == "nope" else str(path),
                     "--output", str(tmp_path / "out.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out.yaml").exists()


def test_compile_writes_other_profiles_beside_the_checked_in_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compile", "--profile", "cpu"]) == 0
    out = tmp_path / "build" / "tuning_pipeline-cpu.yaml"
    assert f"compiled {out.relative_to(tmp_path)} (cluster profile cpu)" in capsys.readouterr().out
    assert "accelerator" not in out.read_text()


# ---------------------------------------------------------------- images


def test_training_steps_use_the_gpu_image_and_light_steps_the_cpu_image(compiled):
    executors = next(yaml.safe_load_all(cli.COMPILED.read_text()))["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        expected = "/kftune-cpu:0.1.0" if step_of(name) in CPU_IMAGE_STEPS else "/kftune:0.1.0"
        assert executor["container"]["image"].endswith(expected), name
    # The cpu profile runs every step on the CPU image: no CUDA image pulled on a CPU pool.
    for name, executor in read(compiled["cpu"])[1].items():
        assert executor["container"]["image"].endswith("/kftune-cpu:0.1.0"), name


def test_one_registry_setting_retargets_both_images_as_make_images_tags_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("KFTUNE_IMAGE", "KFTUNE_CPU_IMAGE")}
    make = subprocess.run(["make", "-n", "images", "IMAGE_REGISTRY=r.example/team", "TAG=9.9"],
                          capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout
    built = re.findall(r"docker build -f \S+ --build-arg KFTUNE_IMAGE_REF=(\S+) --build-arg KFTUNE_GIT_COMMIT=\S* "
                       r"-t (\S+) \.", make)
    # Each image is told its own name, which every export it makes records.
    assert all(ref == tag for ref, tag in built), built
    built = {tag for _, tag in built}
    assert built == {"r.example/team/kftune:9.9", "r.example/team/kftune-cpu:9.9"}
    subprocess.run([sys.executable, "-m", "pipelines.cli", "compile", "--output", str(tmp_path / "p.yaml")], check=True,
                   cwd=ROOT, env={**env, "KFTUNE_REGISTRY": "r.example/team", "KFTUNE_TAG": "9.9"}, capture_output=True)
    executors = next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == built


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_are_pinned_and_run_as_a_non_root_user(dockerfile):
    text = (ROOT / "images" / dockerfile).read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base), f"{dockerfile}: base image {base} is not pinned to a release"
    installs = re.findall(r"pip install (.*)", text)
    assert installs and all("-c constraints.txt" in line or "--no-deps" in line for line in installs), installs
    assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "1000"


def test_the_image_constraints_pin_every_runtime_dependency_within_its_range():
    pins = dict(line.split("==", 1) for line in (ROOT / "images" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in map(Requirement, dependencies):
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"images/constraints.txt has no pin for {name}: run `make constraints`"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"


# ---------------------------------------------------------------- kind


@pytest.mark.skipif(shutil.which("kind") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0,
                    reason="docker and kind are here: `make kind-e2e` would really run")
@pytest.mark.parametrize("target", ["kind-up", "kind-load", "kind-e2e"])
def test_kind_targets_skip_with_a_message_where_docker_or_kind_are_missing(target):
    # -o: never reinstall the virtualenv here, even when pyproject.toml is newer than it.
    done = subprocess.run(["make", "-s", "-o", ".venv/.kftune-installed", target], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"make {target}: skipped: (docker is not installed|no Docker engine is running .*|kind is not "
                        rf"installed .*|kubectl is not installed|helm is not installed .*)\.\n", done.stdout), done.stdout


def test_kind_installs_the_standalone_manifests_of_the_pinned_release():
    script = (ROOT / "deploy" / "kind" / "kind.sh").read_text()
    assert "manifests/kustomize" in script and "cluster-scoped-resources?ref=$KFP_VERSION" in script
    assert "env/platform-agnostic?ref=$KFP_VERSION" in script and not re.search(r"apply -k \S*env/dev", script)
    # Backend releases are tagged apart from the SDK's (sdk-2.x.y): the kind cluster pins a backend tag that
    # exists, of the SDK's minor release (the pairs the README states).
    pinned = re.search(r"^KFP_VERSION \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    from importlib.metadata import version

    assert pinned == KFP_BACKEND_RELEASE
    assert pinned.rsplit(".", 1)[0] == version("kfp").rsplit(".", 1)[0] == version("kfp-server-api").rsplit(".", 1)[0]
    assert f"| {version('kfp')} | {pinned} |" in (ROOT / "README.md").read_text()
    assert cluster.Profile.load(ROOT / "deploy" / "kind" / "profile.yaml").defaults["volumes"] == [
        {"pvc": "kftune-shared", "mount_path": "/mnt/kftune"}]
    with pytest.raises(InputError):
        cluster.Profile.load(ROOT / "deploy" / "kind" / "missing.yaml")


def test_the_kind_run_passes_only_parameters_the_pipeline_takes():
    from kftune import parameters

    script = (ROOT / "deploy" / "kind" / "kind.sh").read_text()
    command = script.split('"$KFTUNE" submit', 1)[1].split("\n}", 1)[0]
    given = dict(re.findall(r"(?<![-\w])([a-z_]+)=(\S+)", command))
    assert "max_trials" in given and set(given) <= set(parameters.BY_NAME), sorted(set(given) - set(parameters.BY_NAME))


def test_kind_installs_kserve_of_a_pinned_release_in_raw_deployment_mode_and_lets_the_runs_deploy():
    from kftune import deploy

    script = (ROOT / "deploy" / "kind" / "kind.sh").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^KSERVE_VERSION \?= (\S+)", makefile, re.M).group(1) == KSERVE_RELEASE
    assert re.search(r"^CERT_MANAGER_VERSION \?= (\S+)", makefile, re.M).group(1) == CERT_MANAGER_RELEASE
    # KServe's released charts at the pinned tag, as its quick install uses them, in Standard (raw) mode.
    for chart in ("kserve-crd", "kserve-resources", "kserve-runtime-configs"):
        assert re.search(rf"helm upgrade -i {chart} oci://ghcr\.io/kserve/charts/{chart} .*\n?.*--version "
                         rf'"\$KSERVE_VERSION"', script), chart
    assert "--set kserve.controller.deploymentMode=Standard" in script
    assert "--set kserve.servingruntime.enabled=true" in script
    assert '--version "$CERT_MANAGER_VERSION" --set crds.enabled=true' in script
    assert script.index("kserve\n}") > script.index("Kubeflow Pipelines is up")  # after KFP
    # The pipeline's service account gets exactly what the deploy step calls, in its namespace.
    role, binding = yaml.safe_load_all((ROOT / "deploy" / "kind" / "serving-rbac.yaml").read_text())
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubeflow"
    assert role["rules"] == [{"apiGroups": [deploy.GROUP], "resources": [deploy.PLURAL], "verbs": list(deploy.VERBS)}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert 'apply -f "$here/serving-rbac.yaml"' in script


def test_the_kind_run_deploys_and_queries_the_model_with_a_jpeg():
    script = (ROOT / "deploy" / "kind" / "kind.sh").read_text()
    command = script.split('"$KFTUNE" submit', 1)[1].split("\n}", 1)[0]
    assert 'serving_name="$serving"' in command and "serving_storage_uri=pvc://kftune-shared/exports" in command
    assert "export_version" not in command  # the next free number: a rerun never collides with an earlier one
    assert command.rstrip().endswith('query "$serving"')
    query = script.split("\nquery() {", 1)[1]
    assert 'port-forward "svc/$name-predictor" "$SERVING_PORT:80"' in query
    assert "/v1/models/$name:predict" in query and '{"image_bytes": {"b64":' in query
    assert 'cv2.imencode(".jpg"' in query and "sys.exit(" in query
