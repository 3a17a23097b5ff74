"""A Kubernetes API server on loopback: the custom-objects REST calls the deploy step makes for InferenceServices.

No Kubernetes can run where the tests run (no Docker, no kind), so this is a
real HTTP server (http.server in a thread) answering the paths of
``serving.kserve.io/v1beta1`` ``inferenceservices`` as the API server does, and
the real ``kubernetes`` client configured at its URL makes the calls: it
serialises, sends and parses exactly as it would against a cluster. It keeps
the objects in memory (generation, resourceVersion, 409 on a stale write),
records every request, and plays KServe's controller: each object's status
goes from nothing to not Ready to Ready (with a URL) over a few reads. It can
also answer as a cluster without KServe (404 on the resource list), as one that
forbids the caller (403, worded as the API server words it), or as one whose
model never becomes Ready or fails to load.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field

from loopback import LoopbackApi

PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"
_PATH = re.compile(r"^/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/]+))?$")
RUNNER = "system:serviceaccount:kubeflow:pipeline-runner"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None = None


@dataclass
class Stored:
    obj: dict
    reads: int = 0  # status reads since the last write that changed the spec
    stale: dict = field(default_factory=dict)  # the status before that write


def _status(code: int, reason: str, message: str, **details) -> tuple[int, dict]:
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                  "reason": reason, "code": code, **({"details": details} if details else {})}


class KubeServer(LoopbackApi):
    """``with KubeServer() as server:`` then ``server.client()`` is a kubernetes ApiClient pointed at it.

    Args:
        kserve: False answers every InferenceService path with 404, as an API server without the CRD.
        forbidden: Verbs (get, list, create, update) answered with 403 for the service account ``user``.
        ready_after: Status reads after a write before the object is Ready.
        never_ready: Ready stays False (the Deployment never has a ready replica).
        fails_to_load: KServe reports the model as failed to load (BlockedByFailedLoad).
        stale_reads: After an update that changes the spec, reads that still return the previous status,
            as before KServe's controller has reconciled the update.
        deployment_mode: What KServe reports in status.deploymentMode.
        reject: A message the admission webhook answers writes with (422).
        namespaces: The namespaces that exist.
    """

    def __init__(self, *, kserve: bool = True, forbidden: tuple[str, ...] = (), user: str = RUNNER,
                 ready_after: int = 3, never_ready: bool = False, fails_to_load: bool = False, stale_reads: int = 0,
                 deployment_mode: str = "Standard", reject: str = "", namespaces=("kubeflow", "default", "models")):
        self.kserve, self.forbidden, self.user = kserve, set(forbidden), user
        self.ready_after, self.never_ready, self.fails_to_load = ready_after, never_ready, fails_to_load
        self.stale_reads, self.deployment_mode, self.reject = stale_reads, deployment_mode, reject
        self.namespaces = set(namespaces)
        self.objects: dict[tuple[str, str], Stored] = {}
        self._versions = itertools.count(100)
        super().__init__()

    def client(self):
        """The real kubernetes ApiClient, configured at this server (no credentials, as kind's admin context over HTTP)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    def kubeconfig(self, namespace: str = "kubeflow") -> str:
        """A kubeconfig (YAML) whose current context is this server, for code that loads one itself."""
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "loopback",
            "clusters": [{"name": "loopback", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {}}],
            "contexts": [{"name": "loopback", "context": {"cluster": "loopback", "user": "tester",
                                                           "namespace": namespace}}],
        })

    def calls(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method]

    def put(self, obj: dict, status: dict | None = None) -> None:
        """Stores an InferenceService as if an earlier deploy had made it, with ``status`` as KServe left it."""
        obj = copy.deepcopy(obj)
        obj["metadata"].update(generation=1, resourceVersion=str(next(self._versions)), uid="uid-1")
        obj["status"] = status if status is not None else self._ready(obj)
        self.objects[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = Stored(obj, reads=10**6)

    # -- KServe's controller, played ------------------------------------------

    def _ready(self, obj: dict) -> dict:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        return {
            "conditions": [{"type": "IngressReady", "status": "True"}, {"type": "PredictorReady", "status": "True"},
                           {"type": "Ready", "status": "True"}],
            "url": f"http://{name}-{namespace}.example.com",
            "address": {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"},
            "deploymentMode": self.deployment_mode,
            "observedGeneration": obj["metadata"]["generation"],
            "modelStatus": {"transitionStatus": "UpToDate", "states": {"activeModelState": "Loaded",
                                                                       "targetModelState": "Loaded"}},
        }

    def _progress(self, stored: Stored) -> dict:
        """The status a read sees: the previous one while stale, then none, then not Ready, then Ready."""
        stored.reads += 1
        obj = stored.obj
        if stored.reads <= self.stale_reads and stored.stale:
            return stored.stale
        if stored.reads <= self.stale_reads + 1:
            return {}
        if self.fails_to_load:
            return {"conditions": [{"type": "PredictorReady", "status": "False", "reason": "ModelLoadFailed"},
                                   {"type": "Ready", "status": "False", "reason": "ModelLoadFailed"}],
                    "deploymentMode": self.deployment_mode,
                    "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                    "lastFailureInfo": {"reason": "ModelLoadFailed",
                                                        "message": "could not find a servable version under /mnt/models"}}}
        if self.never_ready or stored.reads < self.stale_reads + self.ready_after:
            return {"conditions": [{"type": "PredictorReady", "status": "False", "reason": "MinimumReplicasUnavailable",
                                    "message": "Deployment does not have minimum availability."},
                                   {"type": "Ready", "status": "False", "reason": "MinimumReplicasUnavailable",
                                    "message": "Deployment does not have minimum availability."}],
                    "deploymentMode": self.deployment_mode,
                    "modelStatus": {"transitionStatus": "InProgress", "states": {"activeModelState": "Loading"}}}
        return self._ready(obj)

    # -- the API -------------------------------------------------------------

    def handle(self, request: Request) -> tuple[int, dict | str]:
        match = _PATH.match(request.path)
        if not self.kserve or not match:
            return 404, "404 page not found\n"
        namespace, name = match.groups()
        verb = {("GET", False): "list", ("GET", True): "get", ("POST", False): "create",
                ("PUT", True): "update", ("PATCH", True): "patch"}.get((request.method, bool(name)))
        if verb is None:
            return _status(405, "MethodNotAllowed", f"the server does not allow {request.method} here")
        if verb in self.forbidden:
            scope = f'"{name}" ' if name else ""
            return _status(403, "Forbidden", f'inferenceservices.serving.kserve.io {scope}is forbidden: User '
                           f'"{self.user}" cannot {verb} resource "inferenceservices" in API group '
                           f'"serving.kserve.io" in the namespace "{namespace}"', group="serving.kserve.io",
                           kind="inferenceservices", **({"name": name} if name else {}))
        key = (namespace, name or (request.body or {}).get("metadata", {}).get("name", ""))
        stored = self.objects.get(key)
        if verb == "list":
            items = [s.obj for (ns, _), s in self.objects.items() if ns == namespace]
            limit = int(request.query.get("limit", len(items) or 1))
            return 200, {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceServiceList",
                         "metadata": {"resourceVersion": "1"}, "items": items[:limit]}
        if verb == "get":
            if stored is None:
                return _status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found',
                               name=name, group="serving.kserve.io", kind="inferenceservices")
            obj = copy.deepcopy(stored.obj)
            obj["status"] = stored.obj["status"] = self._progress(stored)
            return 200, obj
        body = request.body or {}
        if self.reject:
            return _status(422, "Invalid", f'admission webhook "inferenceservice.kserve-webhook-server.validator" '
                                           f"denied the request: {self.reject}")
        if verb == "create":
            if namespace not in self.namespaces:
                return _status(404, "NotFound", f'namespaces "{namespace}" not found', name=namespace, kind="namespaces")
            if stored is not None:
                return _status(409, "AlreadyExists", f'inferenceservices.serving.kserve.io "{key[1]}" already exists')
            obj = copy.deepcopy(body)
            obj["metadata"].update(namespace=namespace, generation=1, resourceVersion=str(next(self._versions)),
                                   uid=f"uid-{len(self.objects) + 1}")
            obj["status"] = {}
            self.objects[key] = Stored(obj)
            return 201, obj
        if verb == "update":
            if stored is None:
                return _status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
            if body.get("metadata", {}).get("resourceVersion") != stored.obj["metadata"]["resourceVersion"]:
                return _status(409, "Conflict", f'Operation cannot be fulfilled on inferenceservices.serving.kserve.io '
                                                f'"{name}": the object has been modified; please apply your changes to '
                                                "the latest version and try again")
            obj = copy.deepcopy(body)
            changed = obj.get("spec") != stored.obj.get("spec")
            obj["metadata"].update(generation=stored.obj["metadata"]["generation"] + changed,
                                   resourceVersion=str(next(self._versions)), uid=stored.obj["metadata"]["uid"])
            obj["status"] = stored.obj["status"]  # the status subresource is not written through the object
            self.objects[key] = Stored(obj, stale=stored.obj["status"]) if changed else Stored(obj, reads=stored.reads)
            return 200, obj
        return _status(405, "MethodNotAllowed", f"{verb} is not served here")

    def parse(self, method: str, path: str, query: dict[str, str], raw: bytes, headers) -> Request:
        return Request(method, path, query, json.loads(raw) if raw else None)
