"""The pipeline's parameters, declared once: every place that lists them is derived from the configs."""

import dataclasses
import inspect
import json

import pytest

from components.validate import validate
from kftune import parameters
from kftune.errors import InputError
from kftune.finetune import FinetuneConfig
from kftune.search import SearchConfig


def test_each_parameter_is_a_config_field_with_its_default_and_docstring_line():
    for p in parameters.PARAMETERS:
        for stage in p.stages:
            cls = parameters.STAGES[stage][0]
            field = {f.name: f for f in dataclasses.fields(cls)}[p.name]
            assert field.default == p.default, (p.name, stage)
        assert p.description and "``" not in p.description, p.name
    assert len({p.name for p in parameters.PARAMETERS}) == len(parameters.PARAMETERS)


def test_the_validation_component_takes_exactly_the_schema():
    # A lightweight component's signature must be written out (KFP reads its source); it is held to the schema.
    signature = inspect.signature(validate.python_func).parameters
    declared = [name for name in signature if name in parameters.BY_NAME]
    assert declared == [p.name for p in parameters.PARAMETERS]
    for p in parameters.PARAMETERS:
        assert signature[p.name].annotation is p.type, p.name
    assert set(signature) - set(parameters.BY_NAME) == {"pipeline_root", "run_id", "search_config", "settings"}


def test_one_seed_feeds_every_step_and_each_value_reaches_its_step():
    settings = parameters.validate({"seed": 7, "finetune_epochs": 4, "parallel_trials": 3, "max_trials": 6})
    assert {settings.ingest.seed, settings.augment.seed, settings.search.seed, settings.finetune.seed,
            settings.prune.seed} == {7}
    assert settings.finetune.finetune_epochs == 4 and settings.search.parallel_trials == 3
    assert json.loads(settings.stage_json("search"))["parallel_trials"] == 3
    assert parameters.load(SearchConfig, settings.stage_json("search")) == settings.search


def test_folds_reach_ingest_which_counts_each_class_first():
    settings = parameters.validate({"folds": 3})
    assert settings.ingest.folds == settings.search.folds == 3
    assert parameters.BY_NAME["folds"].stages == ("search", "ingest")  # listed under the search in the settings table


@pytest.mark.parametrize("values, message", [
    ({"finetune_epochs": "4"}, r"`finetune_epochs` must be a whole number. Received: finetune_epochs='4'"),
    ({"target_sparsity": float("inf")}, r"`target_sparsity` must be a finite number"),
    ({"max_trails": 3}, r"unknown pipeline parameter\(s\) max_trails"),
    ({"weights": "s3://bucket/w.h5", "backbone": "vgg16"}, r"`weights` uses s3://"),
])
def test_bad_values_name_the_parameter(values, message):
    with pytest.raises(InputError, match=message):
        parameters.validate(values)


def test_a_form_sends_whole_floats_for_ints_and_ints_for_floats():
    settings = parameters.validate({"max_trials": 8.0, "target_sparsity": 1 - 1, "parallel_trials": 2})
    assert settings.search.max_trials == 8 and isinstance(settings.search.max_trials, int)
    assert settings.prune.target_sparsity == 0.0 and isinstance(settings.prune.target_sparsity, float)


def test_per_run_locations_default_under_the_pipeline_root():
    resolved = parameters.resolve(parameters.validate({}), "gs://b/root/", "run-1")
    assert resolved.search.search_state_uri == "gs://b/root/kftune-search/run-1"
    # One checkpoint location per run, fine-tune's and prune's folders beside each other in it.
    assert resolved.finetune.checkpoint_uri == resolved.prune.checkpoint_uri == "gs://b/root/kftune-checkpoints/run-1"
    assert resolved.export.export_destination == "gs://b/root/exports"
    given = parameters.resolve(parameters.validate({"checkpoint_uri": "gs://b/ck"}), "gs://b/root", "run-1")
    assert given.finetune.checkpoint_uri == given.prune.checkpoint_uri == "gs://b/ck"
    with pytest.raises(InputError, match="no pipeline root"):
        parameters.resolve(parameters.validate({}), "", "run-1")


def test_the_help_table_lists_every_parameter_with_type_and_default():
    table = parameters.help_table()
    for p in parameters.PARAMETERS:
        assert f"  {p.name} ({p.type_name}, default " in table, p.name
    assert FinetuneConfig.__doc__ and "finetune_epochs (int, default 10)" in table
