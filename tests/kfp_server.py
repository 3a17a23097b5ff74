"""A Kubeflow Pipelines API server on loopback: the v2beta1 REST calls kfp.Client makes for ``kftune submit``.

A real HTTP server (http.server in a thread), not a stand-in for kfp.Client:
the client under test serialises, sends and parses exactly as it would against
a cluster. It keeps pipelines, versions, experiments and runs in memory, records
every request, and plays a scripted list of states for each run it is polled on.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
from dataclasses import dataclass, field

from loopback import LoopbackApi

API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: dict | None = None
    files: dict[str, bytes] = field(default_factory=dict)


def _matches(item: dict, raw_filter: str | None) -> bool:
    """The EQUALS-on-a-field predicates kfp.Client sends (operation as enum name or number)."""
    if not raw_filter:
        return True
    for predicate in json.loads(raw_filter).get("predicates", []):
        if predicate.get("operation") not in ("EQUALS", 1):
            raise ValueError(f"unsupported filter operation {predicate}")
        if item.get(predicate["key"]) != predicate.get("stringValue"):
            return False
    return True


class KfpServer(LoopbackApi):
    """``with KfpServer(run_states=[...]) as server:`` then point kfp.Client at ``server.url``."""

    def __init__(self, run_states: list[str] | None = None, run_error: str = ""):
        self.run_states = run_states or ["PENDING", "RUNNING", "SUCCEEDED"]
        self.run_error = run_error
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self._ids = (f"id-{n}" for n in itertools.count(1))
        super().__init__()

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == API + path]

    def add_pipeline(self, name: str, versions: tuple[str, ...] = ()) -> str:
        pipeline_id = next(self._ids)
        self.pipelines[pipeline_id] = {"pipeline_id": pipeline_id, "display_name": name}
        self.versions[pipeline_id] = [self._version(pipeline_id, v) for v in versions]
        return pipeline_id

    def add_experiment(self, name: str) -> str:
        experiment_id = next(self._ids)
        self.experiments[experiment_id] = {"experiment_id": experiment_id, "display_name": name}
        return experiment_id

    def _version(self, pipeline_id: str, name: str) -> dict:
        return {"pipeline_id": pipeline_id, "pipeline_version_id": next(self._ids), "display_name": name}

    # -- the API -------------------------------------------------------------

    def handle(self, request: Request) -> tuple[int, dict]:
        path, q = request.path.removeprefix(API), request.query
        parts = path.strip("/").split("/")
        if request.method == "GET" and path == "/healthz":
            return 200, {"multi_user": False}
        if request.method == "GET" and path == "/pipelines":
            found = [p for p in self.pipelines.values() if _matches(p, q.get("filter"))]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if request.method == "POST" and path == "/pipelines/upload":
            pipeline_id = self.add_pipeline(q["name"], versions=(q["name"],))
            return 200, self.pipelines[pipeline_id]
        if request.method == "POST" and path == "/pipelines/upload_version":
            if q.get("pipelineid") not in self.pipelines:
                return 404, {"message": f"pipeline {q.get('pipelineid')} not found"}
            version = self._version(q["pipelineid"], q["name"])
            self.versions[q["pipelineid"]].insert(0, version)
            return 200, version
        if request.method == "GET" and len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions":
            found = [v for v in self.versions.get(parts[1], []) if _matches(v, q.get("filter"))]
            found = found[: int(q.get("page_size", len(found)))]
            return 200, {"pipeline_versions": found, "total_size": len(found)} if found else {}
        if request.method == "GET" and path == "/experiments":
            found = [e for e in self.experiments.values() if _matches(e, q.get("filter"))]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if request.method == "POST" and path == "/experiments":
            experiment_id = self.add_experiment(request.body["display_name"])
            return 200, self.experiments[experiment_id]
        if request.method == "POST" and path == "/runs":
            run_id = next(self._ids)
            self.runs[run_id] = {**request.body, "run_id": run_id, "state": "PENDING"}
            return 200, self.runs[run_id]
        if request.method == "GET" and len(parts) == 2 and parts[0] == "runs" and parts[1] in self.runs:
            run_id = parts[1]
            index = min(self.polls.get(run_id, 0), len(self.run_states) - 1)
            self.polls[run_id] = index + 1
            state = self.run_states[index]
            tasks = [{"display_name": "ingest", "state": "SUCCEEDED", "pod_name": "p-1"}]
            if state == "RUNNING":
                tasks.append({"display_name": "fine-tune", "state": "RUNNING", "pod_name": "p-2"})
            elif state == "FAILED":
                tasks.append({"display_name": "fine-tune", "state": "FAILED", "pod_name": "p-2"})
            run = {**self.runs[run_id], "state": state, "run_details": {"task_details": tasks}}
            if state == "FAILED" and self.run_error:
                run["error"] = {"code": 2, "message": self.run_error}
            return 200, run
        return 404, {"message": f"no route for {request.method} {request.path}"}

    def parse(self, method: str, path: str, query: dict[str, str], raw: bytes, headers) -> Request:
        request = Request(method, path, query)
        content_type = headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
            request.files = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                             for part in message.iter_parts()}
        elif raw:
            request.body = json.loads(raw)
        return request
