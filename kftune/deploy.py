"""Serving an exported version with KServe: its InferenceService, stored in the version, applied and waited for.

The export step writes ``inferenceservice.yaml`` into the version it
publishes (:func:`manifest_files`, so the manifest is covered by the version's
``MANIFEST.json`` like every other file), and the deploy step applies exactly
that file (:func:`deploy_version`): what is served is what was exported.

Two runtimes, chosen by the version's ``metadata.json`` (``serving.runtime``,
written by kftune.export):

- ``tensorflow``: KServe's tensorflow runtime (TF Serving) loads the SavedModel.
  ``storageUri`` is the model's base, not the version: TF Serving wants
  ``<base>/<N>/`` and serves the newest N present when the pod starts.
- ``kftune``: the chosen candidate is an int8 TFLite file, which TF Serving
  cannot run; kftune's own predictor (``kftune serve``, KServe's ModelServer,
  V1 and V2 REST on port 8080) runs it in kftune's CPU image. The version is
  handed to it as KServe hands a custom container its model: ``STORAGE_URI``,
  downloaded (or, for ``pvc://``, mounted) at ``/mnt/models`` by KServe's
  storage initializer, with the same credentials the tensorflow runtime uses.

The deploy step talks to the Kubernetes API with the run's service account
(in-cluster config; a kubeconfig outside a cluster). It needs ``get``,
``list``, ``create`` and ``update`` on ``inferenceservices.serving.kserve.io``
in the serving namespace; every refusal is one line naming what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from kftune import storage
from kftune.errors import DeployError, InputError, check_whole_numbers

GROUP, API_VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
KIND = "InferenceService"
RESOURCE = f"{PLURAL}.{GROUP}"
MANIFEST_FILE = "inferenceservice.yaml"
# What the deploy step calls: list (is KServe there?), get, create, update (a second deploy).
VERBS = ("get", "list", "create", "update")
# A pod's own namespace, mounted with its service account's token.
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Seconds between status reads while waiting for Ready; KFTUNE_DEPLOY_POLL_SECONDS, read at each deploy, changes it.
POLL_ENV, POLL_SECONDS = "KFTUNE_DEPLOY_POLL_SECONDS", 5.0
# KServe checks the name against [a-z]([-a-z0-9]*[a-z0-9])? only, but names objects after it:
# in Knative mode the predictor's revision service is <name>-predictor-00001-private, a
# Service name Kubernetes holds to 63 characters, which leaves 39 for the name.
MAX_NAME = 39
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# What KServe's storage initializer reads a model folder from (https:// fetches single files only).
STORAGE_SCHEMES = ("gs://", "s3://", "pvc://")
_STORAGE_URI = re.compile(r"^(gs|s3|pvc)://[^/\s]+(/\S*)?$")
# KServe v0.20's tensorflow ServingRuntime runs tensorflow/serving:2.6.2, older than the ops a
# SavedModel written by TensorFlow 2.21 uses; runtimeVersion picks the image tag. 2.20.0 is the
# newest TF Serving release (tensorflow/serving tag 2.20.0).
TF_SERVING_VERSION = "2.20.0"
PORT = 8080  # KServe's: the predictor Service sends port 80 here
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI for a custom container
# A small image classifier answers a request of 64 photos in well under a second on one CPU,
# and loading it (TensorFlow's runtime included) takes under 1 GiB. No GPU: for models of this
# size a GPU node costs a node and saves milliseconds; a large backbone's predictor is the
# cluster's call (a GPU, its node selector and taint tolerations), made on the stored manifest.
RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
# KServe reports these when the model will not load however long one waits.
_FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")
# Deployment modes in which KServe ignores canaryTrafficPercent (it splits traffic through Knative revisions).
_NO_CANARY_MODES = ("Standard", "RawDeployment")


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """Whether and where the deploy step serves the exported version with KServe.

    Attributes:
        serving_name: The InferenceService to create or update with the exported
            version, only when the gate passed; empty: no deploy step. A DNS-1035
            label of at most 39 characters (lowercase letters, digits, '-').
        serving_namespace: The Kubernetes namespace it is served in; empty: the
            run's own namespace (its pods' service account's).
        serving_storage_uri: Where the InferenceService reads export_destination
            from, in KServe's storageUri schemes; empty: export_destination itself,
            which must then be gs://. Give pvc://CLAIM/PATH when export_destination
            is a folder on a mounted volume (kind: pvc://kftune-shared/exports).
        canary_traffic_percent: Share of requests (1-100) the new version gets
            while the previous one keeps the rest, on a KServe in Knative
            (Serverless) mode; 0: no canary, the new version takes all requests
            once Ready.
        serving_timeout: Seconds the deploy step waits for the InferenceService to
            become Ready; past it the step fails, and the export stays stored.
    """

    serving_name: str = ""
    serving_namespace: str = ""
    serving_storage_uri: str = ""
    canary_traffic_percent: int = 0
    serving_timeout: int = 600

    def __post_init__(self):
        name = self.serving_name
        if name and (not isinstance(name, str) or not _DNS_1035.match(name) or len(name) > MAX_NAME):
            raise InputError(
                f"`serving_name` must be a DNS-1035 label of at most {MAX_NAME} characters: lowercase letters, "
                "digits and '-', starting with a letter and ending with a letter or digit (KServe names the "
                f"predictor's objects after it), e.g. digits-classifier. Received: serving_name={name!r}")
        namespace = self.serving_namespace
        if namespace and (not isinstance(namespace, str) or not _DNS_1123.match(namespace) or len(namespace) > 63):
            raise InputError(
                "`serving_namespace` must be a Kubernetes namespace name (lowercase letters, digits and '-', at "
                f"most 63), or empty for the run's own. Received: serving_namespace={namespace!r}")
        uri = self.serving_storage_uri
        if uri and (not isinstance(uri, str) or not _STORAGE_URI.match(uri)):
            raise InputError(
                f"`serving_storage_uri` must be a folder in one of KServe's storage schemes ({', '.join(STORAGE_SCHEMES)}"
                "), e.g. pvc://CLAIM/PATH for a mounted volume, or empty for export_destination itself. "
                f"Received: serving_storage_uri={uri!r}")
        check_whole_numbers(self, {"canary_traffic_percent": 0, "serving_timeout": 1})
        if self.canary_traffic_percent > 100:
            raise InputError("`canary_traffic_percent` must be 0 (no canary) to 100: the share of requests the new "
                             f"version gets. Received: canary_traffic_percent={self.canary_traffic_percent!r}")

    def storage_base(self, export_destination: str) -> str:
        """The model's base as KServe's storage initializer reads it (``storageUri``).

        Raises:
            InputError: export_destination is a folder the serving pods cannot
                read and serving_storage_uri does not say where it is.
        """
        if self.serving_storage_uri:
            return self.serving_storage_uri.rstrip("/")
        if storage.is_gcs(export_destination):
            return export_destination.rstrip("/")
        raise InputError(
            f"`serving_name` is set but `export_destination` `{export_destination}` is a folder in the step's pod, "
            "which an InferenceService cannot read: set `serving_storage_uri` to where KServe finds it (e.g. "
            "pvc://CLAIM/PATH for a folder on a mounted volume), or export to gs://.")


# ---------------------------------------------------------------- the manifest


def run_namespace(namespace_file: str = NAMESPACE_FILE) -> str:
    """The namespace this process runs in: its pod's, else the kubeconfig context's, else ``default``."""
    try:
        with open(namespace_file) as f:
            if namespace := f.read().strip():
                return namespace
    except OSError:
        pass
    try:
        from kubernetes import config

        # KUBECONFIG read now: the kubernetes package reads it once, when first imported.
        _, active = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        return (active or {}).get("context", {}).get("namespace") or "default"
    except Exception:  # noqa: BLE001 - no kubeconfig, or one kubernetes cannot read: the API server's default
        return "default"


def inference_service(config: DeployConfig, version_uri: str, metadata: dict, image: str, *,
                      namespace: str = "") -> dict:
    """The InferenceService that serves the version at ``version_uri`` (``metadata``: its metadata.json).

    Args:
        config: The deploy settings; ``serving_name`` must be set.
        version_uri: The version, ``<export_destination>/<N>``.
        metadata: The version's metadata (its ``serving`` section picks the runtime).
        image: kftune's CPU image, the predictor's container for a TFLite candidate.
        namespace: The namespace; empty: ``serving_namespace``, else :func:`run_namespace`.

    The manifest leaves the deployment mode (``serving.kserve.io/deploymentMode``)
    to the cluster's default: the mode decides the networking a cluster has
    installed (Knative and Istio, or plain Deployments and Services), KServe
    refuses to change it on an existing InferenceService, and a manifest that
    names one fails on a cluster installed with the other. `make kind-up`
    installs KServe with Standard (raw deployment) as the default.
    """
    if not config.serving_name:
        raise InputError("`serving_name` is empty: set it to the InferenceService's name to deploy.")
    serving = metadata.get("serving") or {}
    runtime = serving.get("runtime")
    if runtime not in ("tensorflow", "kftune"):
        raise InputError(f"`{version_uri}`'s metadata.json names no serving runtime (serving.runtime="
                         f"{runtime!r}): export it again with this kftune.")
    base_uri, _, number = version_uri.rstrip("/").rpartition("/")
    number = str(metadata.get("version") or number)
    base = config.storage_base(base_uri)
    name = config.serving_name
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "kftune", "kftune.io/version": number}
    annotations = {
        "kftune.io/export": version_uri,
        "kftune.io/version": number,
        "kftune.io/candidate": str(serving.get("candidate", "")),
        "kftune.io/runtime": runtime,
        "kftune.io/model-file": str(serving.get("model_file", "")),
        "kftune.io/source-run": str(metadata.get("source_run", "")),
    }
    predictor: dict[str, Any] = {
        # On the predictor's pods: each version changes the pod template, so a second deploy of the
        # same name rolls out new pods (the tensorflow runtime's storageUri, the base, does not change).
        "annotations": {"kftune.io/version": number},
        "minReplicas": 1,
    }
    if config.canary_traffic_percent:
        predictor["canaryTrafficPercent"] = config.canary_traffic_percent
    if runtime == "tensorflow":
        predictor["model"] = {
            "modelFormat": {"name": "tensorflow"},
            "runtimeVersion": TF_SERVING_VERSION,
            "storageUri": base,
            "resources": RESOURCES,
        }
    else:
        if not image:
            raise InputError("no predictor image: give kftune's CPU image (components.KFTUNE_CPU_IMAGE).")
        predictor["containers"] = [{
            # KServe downloads STORAGE_URI into /mnt/models only for the container of this name.
            "name": "kserve-container",
            "image": image,
            "command": ["kftune"],
            "args": ["serve", MODEL_DIR, "--port", str(PORT), "--name", name],
            "env": [{"name": "STORAGE_URI", "value": f"{base}/{number}"}],
            "ports": [{"containerPort": PORT, "protocol": "TCP"}],
            # Ready once the model answers: KServe's ModelServer says 503 until it has loaded.
            "readinessProbe": {"httpGet": {"path": f"/v1/models/{name}", "port": PORT},
                               "periodSeconds": 5, "failureThreshold": 60},
            "resources": RESOURCES,
        }]
    return {
        "apiVersion": f"{GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace or config.serving_namespace or run_namespace(),
                     "labels": labels, "annotations": annotations},
        "spec": {"predictor": predictor},
    }


def manifest_yaml(manifest: dict) -> str:
    """The manifest as the YAML stored in the version (``kubectl apply -f`` takes it as it is)."""
    import yaml

    meta = manifest["metadata"]
    header = (f"# kftune: serves version {meta['annotations'].get('kftune.io/version', '')} of "
              f"{meta['annotations'].get('kftune.io/export', '').rpartition('/')[0]} with KServe.\n"
              "# Applied by the pipeline's deploy step; by hand: kubectl apply -f inferenceservice.yaml\n")
    return header + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=100)


def manifest_files(config: DeployConfig, image: str) -> Callable[[str, dict], dict[str, bytes]] | None:
    """The export's ``extra_files``: the version's InferenceService, or None when nothing is deployed."""
    if not config.serving_name:
        return None

    def files(version_uri: str, metadata: dict) -> dict[str, bytes]:
        return {MANIFEST_FILE: manifest_yaml(inference_service(config, version_uri, metadata, image)).encode()}

    return files


# ---------------------------------------------------------------- applying it


@dataclasses.dataclass(frozen=True)
class DeployResult:
    """What the cluster made of an InferenceService: its URL, whether it is Ready, and why (not)."""

    url: str
    ready: bool
    message: str
    address: str = ""  # the in-cluster URL (status.address.url)


def api_client():
    """A Kubernetes API client as the run's service account (in a pod), else as the kubeconfig's user."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
        except (config.ConfigException, OSError) as e:
            raise DeployError(f"no Kubernetes API to deploy to: not in a pod and no usable kubeconfig ({e}). Run "
                              "the pipeline on the cluster, or point KUBECONFIG at it.") from None
    return client.ApiClient(configuration)


def _body(error) -> dict:
    try:
        body = json.loads(error.body or "{}")
        return body if isinstance(body, dict) else {}
    except (TypeError, ValueError):
        return {}


def _refused(error, verb: str, name: str, namespace: str) -> DeployError:
    """One line for an API error: what the cluster said and what to do."""
    message = _body(error).get("message") or (error.reason or "").strip() or f"HTTP {error.status}"
    if error.status == 403:
        user = re.search(r'User "([^"]+)"', message)
        who = user.group(1) if user else "the run's service account"
        account = re.fullmatch(r"system:serviceaccount:([^:]+):([^:]+)", who)
        subject = (f"--serviceaccount={account.group(1)}:{account.group(2)}" if account
                   else "--serviceaccount=NAMESPACE:SERVICE_ACCOUNT")
        return DeployError(
            f"`{who}` may not {verb} {RESOURCE} in namespace `{namespace}` (403 Forbidden): grant it "
            f"{', '.join(VERBS)} there, e.g. `kubectl create role kftune-deploy -n {namespace} "
            f"--verb={','.join(VERBS)} --resource={RESOURCE} && kubectl create rolebinding kftune-deploy "
            f"-n {namespace} --role=kftune-deploy {subject}`.")
    if error.status == 404 and verb == "list":
        return DeployError(
            f"KServe is not installed on this cluster: the Kubernetes API has no {RESOURCE} (404 on listing them "
            f"in `{namespace}`). Install KServe (`make kind-up` does, pinned; https://kserve.github.io/website/), "
            "then deploy again.")
    if error.status == 404 and verb == "create":
        return DeployError(f"cannot create InferenceService `{name}`: {message} (404): create namespace "
                           f"`{namespace}` or set `serving_namespace` to one that exists.")
    if error.status in (400, 422):
        return DeployError(f"the cluster refused InferenceService `{namespace}/{name}` ({error.status}): {message}")
    return DeployError(f"could not {verb} InferenceService `{namespace}/{name}`: HTTP {error.status}: {message}")


def _condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def _describe(status: dict) -> str:
    """The status in a few words: Ready's state and reason, and the model's state when KServe gives one."""
    ready = _condition(status, "Ready")
    if not ready:
        return "no status from KServe yet"
    text = f"Ready={ready.get('status', 'Unknown')}"
    why = ": ".join(s for s in (ready.get("reason"), ready.get("message")) if s)
    if ready.get("status") != "True" and not why:
        waiting = [c for c in status.get("conditions") or [] if c.get("status") != "True" and c.get("type") != "Ready"]
        why = ", ".join(f"{c['type']}={c.get('status')}" + (f" {c['reason']}" if c.get("reason") else "")
                        for c in waiting)
    model = ((status.get("modelStatus") or {}).get("states") or {}).get("activeModelState")
    return text + (f" ({why})" if why else "") + (f", model {model}" if model else "")


def _settled(status: dict) -> bool:
    """Ready, and in Knative mode the newest revision is the ready one (raw mode has no revisions)."""
    if _condition(status, "Ready").get("status") != "True":
        return False
    predictor = (status.get("components") or {}).get("predictor") or {}
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    return not created or created == ready


def _failed(status: dict) -> str:
    """KServe's reason when the model will not load however long one waits; empty otherwise."""
    model = status.get("modelStatus") or {}
    if model.get("transitionStatus") not in _FAILED_TRANSITIONS:
        return ""
    info = model.get("lastFailureInfo") or {}
    return f"{model['transitionStatus']}: {info.get('reason', '')}: {info.get('message', '')}".rstrip(": ")


def apply(manifest: dict, *, timeout: float, progress: Callable[[str], None] = print,
          poll: float | None = None, client=None) -> DeployResult:
    """Creates the InferenceService, or updates the one of that name, then waits until it is Ready.

    A second deploy of the same name replaces its spec (and kftune's labels and
    annotations), so the predictor rolls to the new version. One progress line
    is printed every ``poll`` seconds while waiting.

    Args:
        manifest: The InferenceService (:func:`inference_service`).
        timeout: Seconds to wait for Ready.
        progress: Receives the progress lines.
        poll: Seconds between status reads; default KFTUNE_DEPLOY_POLL_SECONDS, else POLL_SECONDS.
        client: A kubernetes ``ApiClient``; default :func:`api_client`.

    Returns:
        Ready with its URLs; or not Ready, with what KServe last said (a model
        that failed to load, or the timeout).

    Raises:
        DeployError: KServe is missing (the resource list answers 404), the
            service account is refused (403), or the cluster rejects the manifest.
    """
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = CustomObjectsApi(client or api_client())
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = (GROUP, API_VERSION, namespace, PLURAL)
    calls = {"_request_timeout": 30}
    canary = manifest["spec"]["predictor"].get("canaryTrafficPercent")
    verb = "list"
    try:
        api.list_namespaced_custom_object(*where, limit=1, **calls)
        for _ in range(3):  # a conflict (someone else wrote it in between) is read and written again
            try:
                verb = "get"
                existing = api.get_namespaced_custom_object(*where, name, **calls)
            except ApiException as e:
                if e.status != 404:
                    raise
                existing = None
            try:
                if existing is None:
                    verb = "create"
                    written = api.create_namespaced_custom_object(*where, manifest, **calls)
                    before = None
                else:
                    before = existing.get("status") or {}
                    mode = before.get("deploymentMode", "")
                    if canary and mode in _NO_CANARY_MODES:
                        raise DeployError(
                            f"canary_traffic_percent={canary} cannot be honoured: InferenceService `{namespace}/"
                            f"{name}` runs in KServe's {mode} mode, which ignores canaryTrafficPercent and would send "
                            "every request to the new version. Set canary_traffic_percent=0, or use a KServe in "
                            "Knative (Serverless) mode.")
                    verb = "update"
                    written = api.replace_namespaced_custom_object(*where, name, _replacing(existing, manifest), **calls)
                    # Unchanged spec (the same version again): nothing rolls, and the status read before stands.
                    if written.get("metadata", {}).get("generation") == existing.get("metadata", {}).get("generation"):
                        before = None
                break
            except ApiException as e:
                if e.status != 409:
                    raise
        else:
            raise DeployError(f"InferenceService `{namespace}/{name}` kept changing while kftune wrote it (409 "
                              "Conflict three times): deploy again.")
        progress(f"deploy: {'created' if existing is None else 'updated'} InferenceService {namespace}/{name}; "
                 f"waiting up to {timeout:g} s for Ready")
        verb = "get"
        return _wait(api, where, name, before, timeout=timeout, poll=_poll_seconds() if poll is None else poll,
                     progress=progress, calls=calls)
    except ApiException as e:
        raise _refused(e, verb, name, namespace) from None
    except HTTPError as e:
        host = getattr(api.api_client.configuration, "host", "")
        raise DeployError(f"the Kubernetes API at {host} did not answer ({type(e).__name__}: {e}): check the "
                          "cluster, then deploy again.") from None


def _poll_seconds() -> float:
    try:
        return max(0.01, float(os.environ.get(POLL_ENV) or POLL_SECONDS))
    except ValueError:
        raise InputError(f"{POLL_ENV} must be a number of seconds. Received: {os.environ.get(POLL_ENV)!r}") from None


def _replacing(existing: dict, manifest: dict) -> dict:
    """The existing object with the manifest's spec, labels and annotations (others' keys kept)."""
    meta = existing.get("metadata", {})
    ours = manifest["metadata"]
    return {
        **manifest,
        "metadata": {**meta, "labels": {**(meta.get("labels") or {}), **ours["labels"]},
                     "annotations": {**(meta.get("annotations") or {}), **ours["annotations"]}},
        "spec": manifest["spec"],
    }


def _wait(api, where, name, before, *, timeout, poll, progress, calls) -> DeployResult:
    """Polls the status until Ready, a failed load, or the timeout.

    ``before``: the status read before an update that changed the spec; until
    KServe has reconciled the update, the status still describes the previous
    version, Ready included, so that status is not taken for this one's.
    """
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        time.sleep(max(0.0, min(poll, timeout - elapsed)))
        elapsed = time.monotonic() - start
        status = api.get_namespaced_custom_object(*where, name, **calls).get("status") or {}
        current = status != before
        if current and _settled(status):
            url = status.get("url") or ""
            address = (status.get("address") or {}).get("url") or ""
            return DeployResult(url, True, f"Ready after {elapsed:.0f} s", address)
        if current and (reason := _failed(status)):
            return DeployResult("", False, f"InferenceService `{where[2]}/{name}` cannot serve the model: {reason}.")
        state = _describe(status) if current else "KServe has not taken up the update yet"
        if elapsed >= timeout:
            return DeployResult("", False, f"InferenceService `{where[2]}/{name}` was not Ready after {timeout:g} s; "
                                           f"its last status: {state}. Raise serving_timeout if it is still starting "
                                           f"(`kubectl describe inferenceservice {name} -n {where[2]}` says why).")
        progress(f"deploy: {where[2]}/{name}: {state}; {elapsed:.0f} s of {timeout:g} s")


# ---------------------------------------------------------------- the deploy step


@dataclasses.dataclass(frozen=True)
class Deployment:
    """One deploy step's outcome: the version, the manifest applied, and what the cluster made of it."""

    version_uri: str
    manifest_text: str
    manifest: dict
    result: DeployResult

    def markdown(self) -> str:
        """Outcome, URLs, how to query it and the manifest: the Run UI's report (narrow enough for its side pane)."""
        meta = self.manifest.get("metadata", {})
        name, namespace = meta.get("name", ""), meta.get("namespace", "")
        notes = meta.get("annotations") or {}
        headline = "Ready" if self.result.ready else "NOT ready"
        rows = [("InferenceService", f"`{namespace}/{name}`"),
                ("version", f"`{self.version_uri}`"),
                ("candidate", f"{notes.get('kftune.io/candidate', '')} ({notes.get('kftune.io/runtime', '')} runtime)"),
                ("URL", f"`{self.result.url}`" if self.result.url else "none yet"),
                ("in the cluster", f"`{self.result.address}`" if self.result.address else "none yet")]
        text = f"## Serving `{name}`: {headline}\n\n{self.result.message}\n\n| | |\n|---|---|\n"
        text += "".join(f"| {key} | {value} |\n" for key, value in rows)
        text += (
            "\n### Query it\n\n"
            "KServe's V1 REST, one JPEG or PNG per instance:\n\n```bash\n"
            f"kubectl port-forward -n {namespace} svc/{name}-predictor 8080:80 &\n"
            f"curl -s http://localhost:8080/v1/models/{name}:predict \\\n"
            "  -H 'Content-Type: application/json' \\\n"
            "  -d '{\"instances\": [{\"image_bytes\": {\"b64\": \"'$(base64 -w0 photo.jpg)'\"}}]}'\n```\n"
            f"\n### Manifest (`{MANIFEST_FILE}` in the version)\n\n```yaml\n{self.manifest_text.rstrip()}\n```\n")
        return text

    def check(self) -> None:
        """Raises DeployError unless the InferenceService is Ready: a deploy that did not serve fails its step."""
        if not self.result.ready:
            raise DeployError(f"{self.result.message} The export `{self.version_uri}` is stored and unchanged: "
                              f"deploy it again by hand with `kubectl apply -f {MANIFEST_FILE}` from it.")


def deploy_version(version_uri: str, config: DeployConfig, *, progress: Callable[[str], None] = print,
                   poll: float | None = None, client=None) -> Deployment:
    """Applies the InferenceService stored in the version at ``version_uri`` and waits for it.

    The version is checked against its manifest first, so what is served is what
    was exported. A refusal by the cluster (no KServe, no access) is returned as
    a not-Ready outcome, so the step still reports it; :meth:`Deployment.check`
    turns any not-Ready outcome into a DeployError.

    Raises:
        InputError: The version is incomplete or changed, or holds no InferenceService.
    """
    import yaml

    storage.verify_version(version_uri)
    data = storage.read_bytes(f"{version_uri.rstrip('/')}/{MANIFEST_FILE}")
    if data is None:
        raise InputError(f"`{version_uri}` holds no {MANIFEST_FILE}: it was exported with serving_name empty. "
                         "Export again with serving_name set to deploy it.")
    text = data.decode()
    manifest = yaml.safe_load(text)
    try:
        result = apply(manifest, timeout=config.serving_timeout, progress=progress, poll=poll, client=client)
    except DeployError as e:
        result = DeployResult("", False, str(e))
    return Deployment(version_uri, text, manifest, result)
