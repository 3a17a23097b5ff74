"""Cluster profiles: where and how each pipeline step runs on Kubernetes.

A profile is one YAML file (``pipelines/profiles/gke-gpu.yaml``, ``cpu.yaml``,
or your own) with, per step: CPU and memory, GPUs (accelerator, node selector,
tolerations), retries, caching, volumes, and how steps reach object storage.
The pipeline hands its tasks to :func:`apply`, which sets all of it with the
KFP DSL and kfp.kubernetes, so it lives in the compiled YAML and nowhere else.
KFP's local runner ignores these settings: ``make run`` runs the very YAML a
cluster runs.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kfp import dsl, kubernetes

from kftune.errors import InputError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "gke-gpu"

_TOP_KEYS = {"extends", "pipeline_root", "credentials", "image_pull_secrets", "defaults", "steps"}
_STEP_KEYS = {"image", "resources", "accelerator", "node_selector", "tolerations", "retry", "caching", "env", "volumes",
              "security_context"}
# The pipeline's steps, named after their components.
STEPS = ("validate", "ingest", "augment", "search_worker", "search_result", "finetune", "prune", "evaluate",
         "export", "deploy", "gate_failed")
IMAGES = ("gpu", "cpu")
_CREDENTIAL_KEYS = {"secret", "key_file", "mount_path"}
_RETRY_KEYS = {"max_retries", "backoff", "backoff_factor", "max_duration"}
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "toleration_seconds"}
_ROOT_SCHEMES = ("gs://", "s3://", "minio://")
# Values of these would be written into the compiled YAML in clear.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)


def shipped() -> list[str]:
    """The profiles that come with kftune, by name."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _locate(name_or_path: str | Path, relative_to: Path = PROFILES_DIR) -> Path:
    text = str(name_or_path)
    if text in shipped():
        return PROFILES_DIR / f"{text}.yaml"
    path = Path(text)
    if not path.is_absolute() and not path.exists():
        path = relative_to / path
    if path.is_file():
        return path
    raise InputError(f"cluster profile `{text}` not found: give one of {', '.join(shipped())} "
                     "or the path of a profile YAML file.")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise InputError(f"cluster profile `{path}` extends itself through {' -> '.join(map(str, seen))}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"cluster profile `{path}` is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"cluster profile `{path}` must be a mapping of settings. Received: {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise InputError(f"cluster profile `{path}` has unknown key(s) {', '.join(sorted(unknown))}; "
                         f"the keys are: {', '.join(sorted(_TOP_KEYS))}.")
    if "extends" in data:
        base = _read(_locate(data.pop("extends"), path.parent), (*seen, path))
        data = _merge(base, data)
    return data


def _mapping(where: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a mapping. Received: {value!r}")
    return value


def _check_keys(where: str, value, allowed: set[str]) -> dict:
    value = _mapping(where, value)
    unknown = set(value) - allowed
    if unknown:
        raise InputError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}; the keys are: "
                         f"{', '.join(sorted(allowed))}.")
    return value


@dataclass(frozen=True)
class Profile:
    """A cluster profile, read and checked: ``steps`` maps each step to its full settings."""

    name: str
    defaults: dict
    steps: dict[str, dict] = field(default_factory=dict)
    pipeline_root: str = ""
    credentials: dict = field(default_factory=dict)
    image_pull_secrets: tuple[str, ...] = ()

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_PROFILE) -> Profile:
        path = _locate(name_or_path)
        data = _read(path)
        name = path.stem if path.parent == PROFILES_DIR else str(path)
        where = f"cluster profile `{name}`"
        defaults = _check_keys(f"{where}: `defaults`", data.get("defaults"), _STEP_KEYS)
        steps = {}
        for step, settings in _mapping(f"{where}: `steps`", data.get("steps")).items():
            if step not in STEPS:
                raise InputError(f"{where} sets step `{step}`, which the pipeline does not have; its steps are: "
                                 f"{', '.join(STEPS)}.")
            steps[step] = _merge(defaults, _check_keys(f"{where}: step `{step}`", settings, _STEP_KEYS))
        for step, settings in {"defaults": defaults, **steps}.items():
            _check_step(f"{where}: {step}", settings)
        root = data.get("pipeline_root") or ""
        if root and not root.startswith(_ROOT_SCHEMES):
            raise InputError(f"{where}: `pipeline_root` must start with {', '.join(_ROOT_SCHEMES)} "
                             f"(or be empty for the cluster's default). Received: {root!r}")
        credentials = _check_keys(f"{where}: `credentials`", data.get("credentials"), _CREDENTIAL_KEYS)
        pull = data.get("image_pull_secrets") or []
        if not isinstance(pull, list) or not all(isinstance(s, str) and s for s in pull):
            raise InputError(f"{where}: `image_pull_secrets` must be a list of secret names. Received: {pull!r}")
        return cls(name=name, defaults=defaults, steps=steps, pipeline_root=root,
                   credentials=credentials, image_pull_secrets=tuple(pull))

    def settings(self, step: str) -> dict:
        return self.steps.get(step, self.defaults)


def _check_step(where: str, settings: dict) -> None:
    if settings.get("image", "gpu") not in IMAGES:
        raise InputError(f"{where}: `image` must be gpu (kftune's TensorFlow GPU image) or cpu (the slim CPU "
                         f"image). Received: {settings.get('image')!r}")
    _check_keys(f"{where}: `resources`", settings.get("resources"), {"requests", "limits"})
    for kind in ("requests", "limits"):
        _check_keys(f"{where}: `resources.{kind}`", (settings.get("resources") or {}).get(kind), {"cpu", "memory"})
    accelerator = _check_keys(f"{where}: `accelerator`", settings.get("accelerator"), {"type", "count"})
    if accelerator and not accelerator.get("type"):
        raise InputError(f"{where}: `accelerator` needs a `type`, e.g. nvidia.com/gpu. Received: {accelerator!r}")
    _check_keys(f"{where}: `retry`", settings.get("retry"), _RETRY_KEYS)
    if settings.get("retry") and "max_retries" not in settings["retry"]:
        raise InputError(f"{where}: `retry` needs `max_retries`. Received: {settings['retry']!r}")
    for toleration in settings.get("tolerations") or []:
        _check_keys(f"{where}: a toleration", toleration, _TOLERATION_KEYS)
    for volume in settings.get("volumes") or []:
        if set(_check_keys(f"{where}: a volume", volume, {"pvc", "mount_path"})) != {"pvc", "mount_path"}:
            raise InputError(f"{where}: a volume needs `pvc` and `mount_path`. Received: {volume!r}")
    _check_keys(f"{where}: `security_context`", settings.get("security_context"),
                {"run_as_user", "run_as_group", "run_as_non_root"})
    for name in _mapping(f"{where}: `env`", settings.get("env")):
        if _SECRET_NAME.search(name):
            raise InputError(f"{where}: env `{name}` looks like a credential, and its value would be written into "
                             "the compiled YAML: put it in a Kubernetes secret and name the secret under "
                             "`credentials.secret`.")


_active: Profile | None = None


def active() -> Profile:
    """The profile :func:`apply` uses: the one :func:`build` is building with, else the default."""
    global _active
    if _active is None:
        _active = Profile.load(DEFAULT_PROFILE)
    return _active


def _step_name(task: dsl.PipelineTask) -> str:
    return task.component_spec.name.replace("-", "_")


def apply(*tasks: dsl.PipelineTask) -> None:
    """Sets the active profile's settings on each task; each pipeline function calls it with its tasks."""
    profile = active()
    for task in tasks:
        step = _step_name(task)
        try:
            _apply(task, profile.settings(step), profile)
        except (ValueError, TypeError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"cluster profile `{profile.name}`, step `{step}`: {e}") from None


def _apply(task: dsl.PipelineTask, s: dict, profile: Profile) -> None:
    if "image" in s:
        from components import KFTUNE_CPU_IMAGE, KFTUNE_IMAGE

        # Per task: the compiler writes each task's container from task.container_spec.
        task.container_spec.image = KFTUNE_CPU_IMAGE if s["image"] == "cpu" else KFTUNE_IMAGE
    resources = s.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    if "cpu" in requests:
        task.set_cpu_request(str(requests["cpu"]))
    if "memory" in requests:
        task.set_memory_request(str(requests["memory"]))
    if "cpu" in limits:
        task.set_cpu_limit(str(limits["cpu"]))
    if "memory" in limits:
        task.set_memory_limit(str(limits["memory"]))
    if accelerator := s.get("accelerator"):
        # On Kubeflow's own backend the type is the container's resource name
        # (nvidia.com/gpu); the node selector picks the GPU model.
        task.set_accelerator_type(accelerator["type"]).set_accelerator_limit(int(accelerator.get("count", 1)))
    for key, value in (s.get("node_selector") or {}).items():
        kubernetes.add_node_selector(task, label_key=key, label_value=str(value))
    for toleration in s.get("tolerations") or []:
        kubernetes.add_toleration(task, **toleration)
    if retry := s.get("retry"):
        task.set_retry(num_retries=int(retry["max_retries"]), backoff_duration=retry.get("backoff"),
                       backoff_factor=retry.get("backoff_factor"), backoff_max_duration=retry.get("max_duration"))
    task.set_caching_options(enable_caching=bool(s.get("caching", False)))
    for name, value in (s.get("env") or {}).items():
        task.set_env_variable(name, str(value))
    for volume in s.get("volumes") or []:
        kubernetes.mount_pvc(task, pvc_name=volume["pvc"], mount_path=volume["mount_path"])
    if context := s.get("security_context"):
        kubernetes.set_security_context(task, **context)
    if secret := profile.credentials.get("secret"):
        mount = profile.credentials.get("mount_path") or "/var/secrets/google"
        kubernetes.use_secret_as_volume(task, secret_name=secret, mount_path=mount)
        # google-cloud-storage reads the key file this names; the name is a path, not a secret.
        task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS",
                              f"{mount.rstrip('/')}/{profile.credentials.get('key_file') or 'key.json'}")
    if profile.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(profile.image_pull_secrets))


def build(make_pipeline, profile: Profile):
    """The pipeline built by ``make_pipeline`` with ``profile`` applied.

    ``@dsl.pipeline`` runs the pipeline function as it decorates it, so the
    imported pipeline carries the default profile; another profile needs the
    task graph built once more.
    """
    global _active
    previous, _active = _active, profile
    try:
        built = make_pipeline()
    finally:
        _active = previous
    if profile.pipeline_root:
        built.component_spec.implementation.graph.default_pipeline_root = profile.pipeline_root
    return built
