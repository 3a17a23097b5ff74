"""kftune.tuner_compat against the keras-tuner it was written for: the private members it relies on."""

from importlib.metadata import version

import keras_tuner as kt

from kftune import search, tuner_compat


def test_pinned_to_the_keras_tuner_it_was_written_for():
    assert version("keras-tuner") == tuner_compat.KERAS_TUNER_VERSION


def test_the_private_members_used_exist():
    oracle = kt.oracles.RandomSearchOracle(objective="val_accuracy", max_trials=2)
    for name in ("_set_project_dir", "_retry_queue", "_get_trial_dir", "ongoing_trials"):
        assert hasattr(oracle, name), name
    grid = tuner_compat.resumable_grid_oracle()(objective="val_accuracy", max_trials=2)
    assert hasattr(grid, "_ordered_ids") and hasattr(grid, "_populate_next")


def test_a_reload_keeps_other_workers_trials_theirs(tmp_path):
    # keras-tuner's reload queues every running trial for a retry; with many workers that would hand a
    # trial still training in one pod to another.
    config = search.SearchConfig(max_trials=4)
    first = search.ask(config, tmp_path, "worker0")[1]
    second = search.ask(config, tmp_path, "worker1")[1]
    assert first["trial_id"] != second["trial_id"]
    third = search.ask(config, tmp_path, "worker2")[1]
    assert third["trial_id"] not in (first["trial_id"], second["trial_id"])
    # worker0 asking again (a restarted pod) gets its own trial back.
    assert search.ask(config, tmp_path, "worker0")[1]["trial_id"] == first["trial_id"]


def test_the_bayesian_oracle_checks_its_proposals_with_keras_tuners_own_helpers():
    oracle = tuner_compat.distinct_bayesian_oracle()(objective="val_accuracy", max_trials=2)
    assert isinstance(oracle, kt.oracles.BayesianOptimizationOracle)
    for name in ("_duplicate", "_random_populate_space"):
        assert callable(getattr(oracle, name, None)), name
