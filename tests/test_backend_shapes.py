"""The compiled pipeline holds to what the Kubeflow Pipelines backend runs, in both shipped profiles.

kfp.local accepts shapes that the backend (Argo, one driver pod per task
resolving inputs through ML Metadata) fails on, so `make run` passing proves
nothing about them. Each rule here reads the compiled IR and names the
backend issue or the end-to-end pipeline (kubeflow/pipelines
test_data/sdk_compiled_pipelines/valid/critical/) it follows.
"""

import re

import pytest
import yaml

from kftune import parameters
from pipelines import cli, cluster

PROFILES = ["gke-gpu", "cpu"]


@pytest.fixture(scope="module", params=PROFILES)
def compiled(request, tmp_path_factory):
    path = cli.compile_pipeline(tmp_path_factory.mktemp(request.param) / "pipeline.yaml", request.param)
    docs = list(yaml.safe_load_all(path.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return request.param, docs[0], platform


def _dags(spec):
    """(name, dag) of the root and of every component that is a DAG."""
    yield "root", spec["root"]["dag"]
    for name, component in spec["components"].items():
        if "dag" in component:
            yield name, component["dag"]


def _tasks(spec):
    for dag_name, dag in _dags(spec):
        for key, task in dag["tasks"].items():
            yield dag_name, key, task


def _is_dag_task(spec, task) -> bool:
    return "dag" in spec["components"][task["componentRef"]["name"]]


def _loops(spec):
    return [(dag, key, task) for dag, key, task in _tasks(spec) if "parameterIterator" in task or "artifactIterator" in task]


def _inside(spec, component: str) -> set[str]:
    """Every component reachable from ``component``'s DAG (its tasks, their sub-DAGs, ...)."""
    seen, todo = set(), [component]
    while todo:
        dag = spec["components"].get(todo.pop(), {}).get("dag", {})
        for task in dag.get("tasks", {}).values():
            ref = task["componentRef"]["name"]
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return seen


def _executor(spec, task) -> dict:
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]


def _step(task) -> str:
    """The step (component) a task runs: comp-search-worker-2 -> search_worker."""
    return re.sub(r"-\d+$", "", task["componentRef"]["name"].removeprefix("comp-")).replace("-", "_")


def test_no_dag_task_is_named_apart_from_its_key(compiled):
    # kubeflow/pipelines#13239: a named ParallelFor read by dsl.Collected fails at run time; the backend
    # (before 2.16) records a loop's, a condition's or a nested pipeline's DAG execution under its display
    # name (backend/src/v2/driver/dag.go), while consumers look the producer up by its task key.
    _, spec, _ = compiled
    for dag, key, task in _tasks(spec):
        if _is_dag_task(spec, task):
            assert task["taskInfo"]["name"] == key, f"{dag}/{key} is displayed as {task['taskInfo']['name']!r}"


def test_one_loop_with_no_loop_inside_it_and_no_condition_around_it(compiled):
    # The backend's suite collects only out of a single loop (critical/collected_parameters,
    # critical/parameters_simple); no nested loop is collected there, and the SDK refuses a fan-in out of a
    # loop inside a condition. So: one loop, in the root DAG, with no loop in it.
    _, spec, _ = compiled
    loops = _loops(spec)
    assert len(loops) == 1, [key for _, key, _ in loops]
    (dag, key, loop), = loops
    assert dag == "root", f"the loop {key} sits inside {dag}"
    assert not any("parameterIterator" in t or "artifactIterator" in t
                   for c in _inside(spec, loop["componentRef"]["name"]) for t in spec["components"].get(c, {}).get("dag", {}).get("tasks", {}).values())
    # Its items come from a task output, as in collected_parameters (split_ids.output).
    items = loop["parameterIterator"]["items"]["inputParameter"]
    assert loop["inputs"]["parameters"][items]["taskOutputParameter"]["producerTask"] == "validate"


def test_the_loop_is_read_only_by_a_sibling_task_through_collected(compiled):
    _, spec, _ = compiled
    (_, key, loop), = _loops(spec)
    readers = [(k, t) for _, k, t in _tasks(spec)
               for value in t.get("inputs", {}).get("parameters", {}).values()
               if value.get("taskOutputParameter", {}).get("producerTask") == key]
    assert [k for k, _ in readers] == ["search-result"]
    loop_outputs = spec["components"][loop["componentRef"]["name"]]["outputDefinitions"]["parameters"]
    assert all(v["parameterType"] == "LIST" for v in loop_outputs.values())


def test_no_retry_policy_inside_the_loop(compiled):
    # kubeflow/pipelines#13897 (open): retry policies of tasks inside a ParallelFor are ignored by the
    # backend, so a retry there would promise what does not happen. A stopped worker resumes on a rerun.
    _, spec, _ = compiled
    (_, _, loop), = _loops(spec)
    for component in _inside(spec, loop["componentRef"]["name"]):
        for key, task in spec["components"].get(component, {}).get("dag", {}).get("tasks", {}).items():
            assert "retryPolicy" not in task, key


def test_no_parallelism_taken_from_a_parameter(compiled):
    # The backend copies iteratorPolicy.parallelismLimit into a static Argo template at compile time
    # (backend/src/v2/compiler/argocompiler/dag.go): a run-time value cannot set it. The number of
    # parallel trials is the length of the loop's item list instead.
    _, spec, _ = compiled
    for _, key, task in _loops(spec):
        limit = task.get("iteratorPolicy", {}).get("parallelismLimit", 0)
        assert isinstance(limit, int), key


def test_conditions_compare_a_string_output_with_a_string_literal(compiled):
    # As critical/flip_coin and critical/parameter_oneof do: a string output compared with `== True`
    # compiles to `== 'true'` and never matches Python's "True".
    _, spec, _ = compiled
    conditions = [t["triggerPolicy"]["condition"] for _, _, t in _tasks(spec) if "triggerPolicy" in t]
    assert len(conditions) == 3, conditions  # the gate's If and Else, and the deploy step's If
    for condition in conditions:
        assert re.fullmatch(r"!?\(?inputs\.parameter_values\['[\w-]+-Output'\] == '(pass|deploy)'\)?", condition), condition
    assert sum(c.endswith("== 'deploy'") for c in conditions) == 1


def _condition_holding(spec, step: str) -> tuple[str, str, dict]:
    """(DAG it sits in, key, task) of the one condition task whose own DAG runs ``step`` directly."""
    (found,) = [(dag, key, task) for dag, key, task in _tasks(spec) if "triggerPolicy" in task
                and any(_step(t) == step for t in spec["components"][task["componentRef"]["name"]]["dag"]["tasks"].values())]
    return found


def test_the_deploy_step_runs_in_an_if_nested_in_the_gates_pass_branch_on_the_exports_output(compiled):
    # critical/flip_coin is the backend suite's nested condition: in the heads branch, random_num runs and an
    # inner If reads its `Output` (a taskOutputParameter of a sibling in the branch; the branch's own inputs
    # pass through as componentInputParameter). The deploy If is that shape inside the gate's pass branch:
    # one level of nesting, no deeper, and nothing but the deploy step in it.
    _, spec, _ = compiled
    deploys = [(dag, key) for dag, key, task in _tasks(spec) if _step(task) == "deploy"]
    assert len(deploys) == 1, deploys
    outer_dag, inner_key, inner = _condition_holding(spec, "deploy")
    inner_component = spec["components"][inner["componentRef"]["name"]]["dag"]["tasks"]
    assert [_step(t) for t in inner_component.values()] == ["deploy"]
    assert not any("triggerPolicy" in t for t in inner_component.values())
    # The If sits in the gate's pass branch, beside the export it reads...
    branches_dag, pass_key, pass_branch = _condition_holding(spec, "export")
    assert pass_branch["componentRef"]["name"] == outer_dag
    assert pass_branch["triggerPolicy"]["condition"].endswith("== 'pass'")
    assert spec["components"][branches_dag]["dag"]["tasks"][pass_key] is pass_branch
    # ...and its condition reads the export task's Output, produced in that branch.
    channel = re.fullmatch(r"inputs\.parameter_values\['([\w-]+)'\] == 'deploy'", inner["triggerPolicy"]["condition"]).group(1)
    assert inner["inputs"]["parameters"][channel] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "export"}}
    for name, value in inner["inputs"]["parameters"].items():
        assert "taskOutputParameter" in value and value["taskOutputParameter"]["producerTask"] == "export" or \
            "componentInputParameter" in value, name


def test_if_else_and_one_of_only_inside_a_nested_pipeline(compiled):
    # critical/parameter_oneof and critical/if_else_with_oneof_artifacts run If/Else with dsl.OneOf inside a
    # nested pipeline that returns the OneOf; no pipeline of the suite returns a OneOf from its root.
    _, spec, _ = compiled
    root_tasks = spec["root"]["dag"]["tasks"].values()
    assert not any("triggerPolicy" in t for t in root_tasks)
    publish = spec["components"]["comp-publish"]["dag"]
    # A OneOf compiles to an output of the condition-branches DAG, which the nested pipeline returns.
    assert {v["valueFromParameter"]["producerSubtask"]
            for v in publish["outputs"]["parameters"].values()} == {"condition-branches-1"}
    for value in spec["root"]["dag"]["outputs"]["parameters"].values():
        assert value["valueFromParameter"]["producerSubtask"] == "publish"


def test_pipeline_outputs_and_a_description_for_every_parameter(compiled):
    _, spec, _ = compiled
    assert set(spec["root"]["outputDefinitions"]["parameters"]) == {"exported_uri", "chosen_candidate"}
    declared = spec["root"]["inputDefinitions"]["parameters"]
    for name, value in declared.items():
        assert value.get("description"), f"pipeline parameter {name} has no description in the run form"


def test_the_compiled_signature_is_the_schema(compiled):
    _, spec, _ = compiled
    declared = spec["root"]["inputDefinitions"]["parameters"]
    kinds = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}
    assert set(declared) == set(parameters.BY_NAME)
    for p in parameters.PARAMETERS:
        assert declared[p.name]["parameterType"] == kinds[p.type], p.name
        assert declared[p.name]["defaultValue"] == p.default, p.name
        assert declared[p.name]["description"] == p.description, p.name


def test_validation_first_on_the_cpu_image_never_retried_and_every_other_step_after_it(compiled):
    profile, spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    validate = root["validate"]
    assert "retryPolicy" not in validate
    assert _executor(spec, validate)["container"]["image"].endswith("/kftune-cpu:0.1.0")
    assert validate["inputs"]["parameters"].keys() >= set(parameters.BY_NAME)
    # Every root task but validate reads something validate wrote, so none (and no GPU pod) starts before it.
    for key, task in root.items():
        if key == "validate":
            continue
        sources = [v.get("taskOutputParameter", {}).get("producerTask") for v in task.get("inputs", {}).get("parameters", {}).values()]
        sources += [v.get("taskOutputArtifact", {}).get("producerTask") for v in task.get("inputs", {}).get("artifacts", {}).values()]
        assert "validate" in sources or "validate" in task.get("dependentTasks", []), key


def test_one_evaluate_task_and_light_steps_on_the_cpu_image(compiled):
    profile, spec, platform = compiled
    tasks = list(_tasks(spec))
    assert sum(_step(t) == "evaluate" for _, _, t in tasks) == 1
    for _, key, task in tasks:
        if _is_dag_task(spec, task):
            continue
        image = _executor(spec, task)["container"]["image"]
        resources = _executor(spec, task)["container"].get("resources", {})
        gpu = "accelerator" in resources
        if profile == "cpu":
            assert image.endswith("/kftune-cpu:0.1.0") and not gpu, key
        elif _step(task) in ("validate", "ingest", "augment", "evaluate", "export", "deploy", "gate_failed"):
            assert image.endswith("/kftune-cpu:0.1.0") and not gpu, key
        else:
            assert image.endswith("/kftune:0.1.0") and gpu, key


def test_every_profile_step_is_a_pipeline_step():
    spec = next(yaml.safe_load_all(cli.COMPILED.read_text()))
    steps = {_step(t) for _, _, t in _tasks(spec) if not _is_dag_task(spec, t)}
    assert steps == set(cluster.STEPS)
