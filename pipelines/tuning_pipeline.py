"""The kftune pipeline: validate -> ingest -> augment -> search -> fine-tune -> prune -> evaluate -> export -> deploy.

Wiring only. The parameters, their defaults and their descriptions come from
``kftune.parameters`` (the steps' config dataclasses); the validation step
checks them all and hands each step its settings.

Only control-flow shapes the Kubeflow Pipelines backend's own end-to-end suite
runs are used (tests/test_backend_shapes.py holds the compiled YAML to them):
one unnamed ParallelFor over a task's list output whose results a sibling task
outside the loop reads with ``dsl.Collected`` (critical/collected_parameters);
an If/Else on a string task output inside a nested pipeline that returns its
branches' outputs through ``dsl.OneOf`` (critical/parameter_oneof); the root
returning a nested pipeline's outputs (critical/pipeline_with_importer_workspace);
an If nested in a condition's branch on a string output of a task in that
branch (critical/flip_coin: its inner If on random_num, run in the heads
branch), which runs the deploy step only when serving_name is set.
"""

import inspect
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import KFTUNE_CPU_IMAGE
from components.augment import augment
from components.deploy import deploy
from components.evaluate import evaluate, gate_failed
from components.export import export
from components.finetune import finetune
from components.ingest import ingest
from components.prune import prune
from components.search import search_result, search_worker
from components.validate import validate
from kftune import parameters
from pipelines import cluster


class Outputs(NamedTuple):
    exported_uri: str
    chosen_candidate: str


# The pipeline's signature and docstring (the run form's fields and descriptions), derived from the schema.
_SIGNATURE = inspect.Signature(
    [inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type)
     for p in parameters.PARAMETERS],
    return_annotation=Outputs,
)
_DOC = "Search, fine-tune, prune, evaluate and export a Keras image classifier.\n\nArgs:\n" + "".join(
    f"    {p.name}: {p.description}\n" for p in parameters.PARAMETERS) + (
    "\nReturns:\n    exported_uri: The exported version's URI; empty when no candidate passed the gate.\n"
    "    chosen_candidate: The candidate the gate chose (baseline, finetuned, pruned or quantized).\n")


def _tuning_pipeline(publish, *args, **kwargs) -> Outputs:
    p = _SIGNATURE.bind(*args, **kwargs).arguments
    checked = validate(**p, pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    checked.set_display_name("validate settings")
    data = ingest(config=checked.outputs["ingest"]).set_display_name("ingest")
    augmented = augment(dataset=data.outputs["dataset"], config=checked.outputs["augment"]).set_display_name("augment")
    train_data = augmented.outputs["augmented"]

    # One worker per parallel trial; each trains trials until max_trials are done.
    with dsl.ParallelFor(checked.outputs["Output"]) as worker:
        workers = search_worker(dataset=train_data, search_config=checked.outputs["search_config"], worker=worker)
        workers.set_display_name("search worker")
    searched = search_result(dataset=train_data, search_config=checked.outputs["search_config"],
                             workers_done=dsl.Collected(workers.output)).set_display_name("search result")

    tuned = finetune(dataset=train_data, baseline=searched.outputs["model"], config=checked.outputs["finetune"])
    tuned.set_display_name("fine-tune")
    pruned = prune(dataset=train_data, model=tuned.outputs["model"], config=checked.outputs["prune"])
    pruned.set_display_name("prune")
    published = publish(dataset=data.outputs["dataset"], baseline=searched.outputs["model"],
                        finetuned=tuned.outputs["model"], pruned=pruned.outputs["pruned"],
                        gate_config=checked.outputs["gate"], export_config=checked.outputs["export"],
                        deploy_config=checked.outputs["deploy"], run_parameters=checked.outputs["parameters"])
    # No display name on a DAG task (nested pipeline, loop, condition): older backends record those
    # under their display name while consumers look them up by key (kubeflow/pipelines#13239).

    cluster.apply(checked, data, augmented, workers, searched, tuned, pruned)
    return Outputs(published.outputs["exported_uri"], published.outputs["chosen_candidate"])


def _publish(dataset: Input[Dataset], baseline: Input[Model], finetuned: Input[Model], pruned: Input[Model],
            gate_config: str, export_config: str, deploy_config: str = "{}", run_parameters: str = "{}") -> Outputs:
    """Evaluates, gates, exports and deploys: the If/Else and OneOf shape of the backend suite's parameter_oneof,
    with flip_coin's nested If in the pass branch."""
    evaluated = evaluate(dataset=dataset, baseline=baseline, finetuned=finetuned, pruned=pruned,
                         gate_config=gate_config).set_display_name("evaluate and gate")
    with dsl.If(evaluated.outputs["Output"] == "pass"):
        exported = export(model=evaluated.outputs["chosen"], dataset=dataset, config=export_config,
                          evaluations=evaluated.outputs["evaluations"], gate_config=gate_config,
                          run_parameters=run_parameters, deploy_config=deploy_config, serving_image=KFTUNE_CPU_IMAGE,
                          run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER).set_display_name("export")
        # Only with serving_name set: export says so in its Output ("deploy"), which this If reads
        # as flip_coin's inner If reads random_num's output.
        with dsl.If(exported.outputs["Output"] == "deploy"):
            deployed = deploy(exported_uri=exported.outputs["exported_uri"], config=deploy_config)
            deployed.set_display_name("deploy")
    with dsl.Else():
        failed = gate_failed(evaluations=evaluated.outputs["evaluations"], gate_config=gate_config)
        failed.set_display_name("not exported: gate failed")
    cluster.apply(evaluated, exported, deployed, failed)
    return Outputs(dsl.OneOf(exported.outputs["exported_uri"], failed.outputs["exported_uri"]),
                   dsl.OneOf(exported.outputs["chosen_candidate"], failed.outputs["chosen_candidate"]))


def make_pipeline():
    """Builds the pipeline (and its nested ``publish`` pipeline) with the active cluster profile.

    ``@dsl.pipeline`` runs a pipeline function as it builds it, so the settings
    pipelines/cluster.py applies are fixed then: another profile needs both
    built again (``cluster.build``).
    """
    publish = dsl.pipeline(name="publish", description=_publish.__doc__)(_publish)

    def root(*args, **kwargs) -> Outputs:
        return _tuning_pipeline(publish, *args, **kwargs)

    root.__signature__ = _SIGNATURE
    root.__doc__ = _DOC
    root.__annotations__ = {**{p.name: p.type for p in parameters.PARAMETERS}, "return": Outputs}
    return dsl.pipeline(name="kftune-tuning", description=_DOC.split("\n")[0])(root)


tuning_pipeline = make_pipeline()
