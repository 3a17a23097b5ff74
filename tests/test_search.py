"""Search: the YAML space, keras-tuner's oracles driving real trials, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kftune import dataset, models, search, search_state
from kftune.errors import InputError

SPACE = """
learning_rate: {type: float, min: 0.001, max: 0.01, sampling: log}
batch_size: {type: choice, values: [32, 64]}
dense_units: {type: int, min: 16, max: 64, step: 16}
optimizer: {type: choice, values: [adam, sgd]}
momentum: {type: float, min: 0.0, max: 0.9, when: {optimizer: [sgd]}}
"""


@pytest.mark.parametrize("text, message", [
    ("lr: {type: floaty, min: 0, max: 1}", "`type` must be one of"),
    ("lr: {type: float, min: 0.1, max: 0.01}", "`min` must be less than `max`"),
    ("units: {type: choice, values: []}", "non-empty list"),
    ("lr: {type: float, min: 0.0, max: 0.1, mn: 1}", r"unknown key\(s\) \['mn'\]"),
    ("lr: {type: float, min: 0.0, max: 0.1, sampling: log}", "log sampling needs min > 0"),
    ("lr: {type: float, min: low, max: 0.1}", "`min` must be a number"),
    ("m: {type: float, min: 0, max: 1, when: {optimizer: [sgd]}}", "must be declared above"),
    ("o: {type: choice, values: [adam]}\nm: {type: float, min: 0, max: 1, when: {o: [sgd]}}", "not choices of `o`"),
    ("- a\n- b", "non-empty YAML mapping"),
    ("lr: [", "not valid YAML"),
    ("lr: 0.1", "must be a mapping"),
])
def test_bad_spaces_name_the_field(text, message):
    with pytest.raises(InputError, match=message):
        search.SearchSpace.from_yaml(text)


def test_space_becomes_keras_tuner_hyperparameters_with_conditions():
    space = search.SearchSpace.from_yaml(SPACE)
    hp = space.hyperparameters()
    assert [p.name for p in hp.space] == ["learning_rate", "batch_size", "dense_units", "optimizer", "momentum"]
    assert hp.space[0].sampling == "log"
    hp.values["optimizer"] = "adam"
    assert not hp.is_active("momentum")
    hp.values["optimizer"] = "sgd"
    assert hp.is_active("momentum")


@pytest.mark.parametrize("kwargs, message", [
    ({"search_algorithm": "genetic"}, "`search_algorithm` must be one of"),
    ({"max_trials": 0}, "max_trials"),
    ({"trial_epochs": -1}, "epochs"),
    ({"folds": 0}, "folds"),
    ({"model": "no_such_module:build"}, "cannot be imported"),
    ({"early_stopping": "patience"}, r"`early_stopping` must be one of \('none', 'median'\)"),
    ({"search_algorithm": "asha", "early_stopping": "median"}, "asha stops trials itself"),
    ({"search_algorithm": "tpe", "search_space": "{lr: {type: float, min: 0.001, max: 0.1, sampling: reverse_log}}"},
     r"search space `lr`: Optuna .* has no reverse_log sampling"),
    ({"search_algorithm": "asha", "search_space": "{lr: {type: float, min: 0.001, max: 0.1, step: 0.01, "
                                                  "sampling: log}}"},
     r"search space `lr`: Optuna \(search_algorithm=tpe or asha\) cannot take it: .*step"),
])
def test_bad_search_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        search.SearchConfig(**kwargs)


def test_grid_needs_steps_for_floats():
    with pytest.raises(InputError, match="grid search needs a `step`"):
        search.SearchConfig(search_algorithm="grid", search_space=SPACE)
    assert search.SearchSpace.from_yaml(search.CLASSIC_SPACE_YAML).grid_size() == 9
    assert search.SearchSpace.from_yaml("units: {type: int, min: 1, max: 4}").grid_size() == 4


@pytest.mark.parametrize("fields, message", [
    ({"parallel_trials": 4, "max_trials": 2}, "`parallel_trials`=4 is more than `max_trials`=2"),
    ({"search_algorithm": "grid", "max_trials": 12}, "more than the 9 points of the grid"),
])
def test_trials_that_cannot_all_run_are_refused_before_training(fields, message):
    with pytest.raises(InputError, match=message):
        search.SearchConfig(**fields).check_workers()
    search.SearchConfig(search_algorithm="grid", max_trials=9, parallel_trials=3).check_workers()


def test_a_grid_search_of_part_of_its_grid_says_so_before_training(caplog):
    assert search.SearchConfig(search_algorithm="grid", max_trials=9).partial_grid() == ""
    with caplog.at_level("WARNING", logger="kftune.search"):
        search.SearchConfig(search_algorithm="grid", max_trials=4).check_workers()
    assert "max_trials=4 runs 4 of the 9 points of the grid" in caplog.text
    assert "set max_trials=9" in caplog.text


@pytest.mark.parametrize("algorithm", search.ALGORITHMS)
def test_each_algorithm_runs_real_trials(algorithm, digits_dir, tmp_path):
    space = search.CLASSIC_SPACE_YAML if algorithm == "grid" else SPACE
    config = search.SearchConfig(search_algorithm=algorithm, max_trials=2, trial_epochs=2, hyperband_factor=2,
                                 search_space=space, search_state_uri=str(tmp_path))
    best = search.search(digits_dir, config, progress=lambda _: None)
    results = search.told(tmp_path)
    assert len(results) >= 2
    # asha may stop a trial after its first epoch (not in the top half there): stopped, not failed.
    assert all(r.status == "COMPLETED" or (algorithm == "asha" and r.status == "STOPPED") for r in results)
    assert best.objective == max(r.objective for r in results if r.status == "COMPLETED")
    assert best.objective > 0.3  # ten classes: chance is 0.1
    if algorithm == "hyperband":
        assert any(r.epochs < config.trial_epochs for r in results) or len(results) > 2
    winner, trials = search.save_best_model(digits_dir, config, tmp_path / "best")
    assert (tmp_path / "best" / "model.keras").exists() and winner == best and trials == results
    assert all(r.curve and r.curve[-1][1] == r.objective for r in results)  # the learning curve the Run UI draws
    # The objective is the score of the model handed on: its accuracy on the validation split.
    model, _ = models.load(tmp_path / "best")
    models.compile_model(model, 10)
    _, accuracy = model.evaluate(dataset.batches(dataset.load_split(digits_dir, "validation")), verbose=0)
    assert accuracy == pytest.approx(winner.objective, abs=1e-6)


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_same_seed_same_trials(tmp_path, algorithm):
    asked = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        config = search.SearchConfig(search_algorithm=algorithm, max_trials=4, seed=seed, search_space=SPACE)
        asked.append([search.ask(config, tmp_path / name, f"worker{i}")[1]["values"] for i in range(4)])
    assert asked[0] == asked[1]
    assert asked[0] != asked[2]
    assert len({json.dumps(v, sort_keys=True) for v in asked[0]}) == 4


def test_k_fold_objective_is_the_mean_of_fold_scores(digits_dir, tmp_path):
    config = search.SearchConfig(search_algorithm="random", max_trials=1, parallel_trials=1, trial_epochs=1, folds=3,
                                 search_state_uri=str(tmp_path))
    best = search.search(digits_dir, config, progress=lambda _: None)
    assert len(best.fold_scores) == 3
    assert best.objective == pytest.approx(sum(best.fold_scores) / 3)
    assert best.epochs == 3
    # Each fold's score is its final epoch's, as a trial's is.
    for fold, score in enumerate(best.fold_scores):
        logged = json.loads((tmp_path / search.TRIALS_DIR / "trial_0" / f"fold{fold}.epochs.json").read_text())
        assert score == logged[-1]["val_accuracy"]


def _dense_units_model(tmp_path, monkeypatch, name: str, when_13: str, values: list[int]) -> search.SearchConfig:
    """A grid over ``values`` of dense_units of small_cnn, whose builder runs ``when_13`` (a line) for 13."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import os, signal
        from kftune.models import small_cnn
        def build(input_shape, num_classes, dense_units=32, **kw):
            with open({str(tmp_path / "pids")!r}, "a") as f:
                f.write(f"{{dense_units}} {{os.getpid()}}\\n")
            if dense_units == 13:
                {when_13}
            return small_cnn(input_shape, num_classes, dense_units=dense_units)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return search.SearchConfig(search_algorithm="grid", max_trials=len(values), trial_epochs=1, model=f"{name}:build",
                               search_space=f"dense_units: {{type: choice, values: {values}}}",
                               search_state_uri=str(tmp_path / "state"))


def test_a_crashing_trial_is_recorded_and_the_search_goes_on(digits_dir, tmp_path, monkeypatch):
    config = _dense_units_model(tmp_path, monkeypatch, "fragile",
                                "raise MemoryError(\"out of memory (simulated by the user's own code)\")", [13, 32])
    best = search.search(digits_dir, config, progress=lambda _: None)
    statuses = {r.values["dense_units"]: r for r in search.told(tmp_path / "state")}
    assert statuses[13].status == "FAILED" and "MemoryError" in statuses[13].error
    assert best.values["dense_units"] == 32


@pytest.mark.parametrize("space", [search.CLASSIC_SPACE_YAML, "dense_units: {type: choice, values: [8, 16, 24]}"])
def test_a_model_function_that_fails_on_its_first_call_stops_the_search_at_once(digits_dir, tmp_path, monkeypatch,
                                                                                 space):
    # Takes a builder's arguments, then fails on every call as a function that is no model builder does: one
    # line after the first trial (and one more call with other values when the space has model arguments).
    (tmp_path / "no_builder.py").write_text(textwrap.dedent(f"""
        def build(input_shape, num_classes, **kw):
            with open({str(tmp_path / "calls")!r}, "a") as f:
                f.write("call\\n")
            return sorted(input_shape, key=num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = search.SearchConfig(search_algorithm="grid", max_trials=3, parallel_trials=1, trial_epochs=1,
                                 model="no_builder:build", search_space=space, search_state_uri=str(tmp_path / "state"))
    with pytest.raises(InputError, match=r"`model` `no_builder:build` is no model builder kftune can call: it raised "
                                         r"TypeError: 'int' object is not callable for the first trial"):
        search.work(digits_dir, config, progress=lambda _: None)
    assert len((tmp_path / "calls").read_text().split()) == (1 if space == search.CLASSIC_SPACE_YAML else 2)
    assert not list((tmp_path / "state").rglob("*.epochs.json"))


def test_trials_share_a_child_process_and_one_that_kills_it_is_recorded_and_replaced(digits_dir, tmp_path,
                                                                                    monkeypatch):
    # A worker's trials run in one child process (its start-up, seconds of TensorFlow, is paid once), not in
    # the worker's own: a trial that ends it (here SIGKILL, as the kernel's OOM killer sends) is a FAILED
    # trial, the next trial gets a new process, and the search goes on.
    config = _dense_units_model(tmp_path, monkeypatch, "killer", "os.kill(os.getpid(), signal.SIGKILL)", [32, 16, 13, 8])
    ran = search.work(digits_dir, config, progress=lambda _: None)
    assert [r.values["dense_units"] for r in ran] == [32, 16, 13, 8]
    statuses = {r.values["dense_units"]: r for r in search.told(tmp_path / "state")}
    assert statuses[13].status == "FAILED" and "process ended" in statuses[13].error
    assert all(statuses[units].status == "COMPLETED" for units in (32, 16, 8)), statuses
    pids = dict(line.split() for line in (tmp_path / "pids").read_text().splitlines())
    assert pids["32"] == pids["16"] == pids["13"] != pids["8"]
    assert str(os.getpid()) not in pids.values()


def test_a_worker_killed_mid_trial_takes_its_trial_process_with_it(digits_dir, tmp_path, monkeypatch):
    # SIGKILL gives the worker no chance to close its pipe; an orphaned trial process would train on and
    # write the trial's folder while the restarted worker resumes the same trial.
    config = _dense_units_model(tmp_path, monkeypatch, "slow", "pass", [13])
    config = search.SearchConfig(**{**config.__dict__, "trial_epochs": 10_000})  # minutes: it must be cut short
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from kftune import search
        search.work({str(digits_dir)!r}, search.SearchConfig(**{config.__dict__!r}), progress=lambda _: None)
    """)
    worker = subprocess.Popen([sys.executable, "-c", script])
    pids, deadline = tmp_path / "pids", time.time() + 120
    while not pids.exists() and worker.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert pids.exists(), "the trial never started"
    child = int(pids.read_text().split()[1])
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    deadline = time.time() + 15  # the trial process looks for its worker every second
    while time.time() < deadline and _state(child) != "Z":
        time.sleep(0.2)
    assert _state(child) == "Z", "the trial process trains on without its worker"


def _state(pid: int) -> str:
    """The process's state letter in /proc; Z (a zombie, done) also for a process that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_a_bad_input_found_in_the_trials_process_ends_the_worker_with_its_line(tmp_path):
    # The user's mistake is not a failed trial to record nine times: it comes back as the one InputError line.
    config = search.SearchConfig(search_algorithm="grid", max_trials=1, trial_epochs=1,
                                 search_space="dense_units: {type: choice, values: [8]}",
                                 search_state_uri=str(tmp_path / "state"))
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(InputError, match="not_a_dataset"):
        search.work(tmp_path / "not_a_dataset", config, progress=lambda _: None)


def test_a_killed_search_resumes_without_losing_or_repeating_trials(digits_dir, tmp_path):
    state = tmp_path / "state"
    config = search.SearchConfig(search_algorithm="random", max_trials=3, trial_epochs=2, search_space=SPACE,
                                 search_state_uri=str(state))
    script = textwrap.dedent(f"""
        from kftune import search
        search.search({str(digits_dir)!r}, search.SearchConfig(**{config.__dict__!r}))
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 300
    # Killed as soon as the first result is stored: the worker is then in the next oracle turn, writing.
    while not (state / search_state.STATE_FILE).exists() or not search.told(state):
        if process.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    told_before = {r.trial_id: r for r in search.told(state)}
    assert told_before, "the first trial never finished"
    assert len(told_before) < 3, "the search finished before it could be killed"

    search.search(digits_dir, config, progress=lambda _: None)
    after = search.told(state)
    assert sorted(r.trial_id for r in after) == ["0", "1", "2"]
    for trial_id, result in told_before.items():  # finished trials were not run again
        assert next(r for r in after if r.trial_id == trial_id) == result


def test_a_killed_trial_resumes_from_its_last_finished_epoch(digits_dir, tmp_path):
    state = tmp_path / "state"
    trial = {"trial_id": "0", "values": {"learning_rate": 0.003, "batch_size": 32}}
    config = search.SearchConfig(trial_epochs=8)
    script = textwrap.dedent(f"""
        from kftune import search
        search.run_trial({str(digits_dir)!r}, {trial!r}, search.SearchConfig(trial_epochs=8), {str(state)!r}, verbose=0)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    epoch_log = state / "fold0.epochs.json"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if epoch_log.exists() and len(json.loads(epoch_log.read_text() or "[]")) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before_kill = len(json.loads(epoch_log.read_text()))
    assert 2 <= finished_before_kill < 8, "the trial was not killed part-way"

    result = search.run_trial(digits_dir, trial, config, state, verbose=0)
    epochs = [e["epoch"] for e in json.loads(epoch_log.read_text())]
    assert epochs == list(range(8)), "every epoch trained exactly once across the kill"
    assert result.status == "COMPLETED" and result.epochs == 8


def _worker_script(digits_dir, config, worker: int) -> str:
    return textwrap.dedent(f"""
        from kftune import search
        search.work({str(digits_dir)!r}, search.SearchConfig(**{config.__dict__!r}), {worker}, in_child=False,
                    poll=0.1)
    """)


@pytest.mark.parametrize("algorithm, epochs", [("random", 1), ("asha", 2)])
def test_parallel_workers_share_one_oracle_and_run_every_trial_once(digits_dir, tmp_path, algorithm, epochs):
    # Two worker processes at once, as two pods of the pipeline's ParallelFor: they take turns at
    # the oracle through the lock, and max_trials is met exactly, with no trial handed out twice.
    # asha's trials report each epoch through the same lock, and no worker waits for a rung to fill.
    state = tmp_path / "state"
    config = search.SearchConfig(search_algorithm=algorithm, max_trials=5, parallel_trials=2, trial_epochs=epochs,
                                 search_space=SPACE, search_state_uri=str(state))
    workers = [subprocess.Popen([sys.executable, "-c", _worker_script(digits_dir, config, i)]) for i in range(2)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    told = search.told(state)
    assert sorted(r.trial_id for r in told) == ["0", "1", "2", "3", "4"]
    assert all(r.status == "COMPLETED" or (algorithm == "asha" and r.status == "STOPPED") for r in told)
    if algorithm == "asha":
        assert {r.trial_id for r in told if r.status == "STOPPED"} == {
            tid for tid, entry in _curves(state).items() if entry["stopped_at"]}
    assert len({json.dumps(r.values, sort_keys=True) for r in told}) == 5
    assert not (state / search.LOCK_FILE).exists()
    # Each trial's checkpoints are in its own folder, apart from the oracle's small files.
    assert sorted(p.name for p in (state / search.TRIALS_DIR).iterdir()) == [f"trial_{i}" for i in range(5)]
    assert sorted(p.name for p in state.iterdir()) == [search_state.STATE_FILE, search.TRIALS_DIR]


def _curves(state) -> dict:
    from kftune.search import stopping

    with search_state.opened(state, write=False) as state_dir:
        return stopping.load(state_dir)


def test_a_restarted_worker_resumes_its_own_trial_and_no_other(digits_dir, tmp_path):
    state = tmp_path / "state"
    config = search.SearchConfig(search_algorithm="random", max_trials=2, parallel_trials=2, trial_epochs=6,
                                 search_space=SPACE, search_state_uri=str(state))
    process = subprocess.Popen([sys.executable, "-c", _worker_script(digits_dir, config, 1)])
    epoch_log = state / search.TRIALS_DIR / "trial_0" / "fold0.epochs.json"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if epoch_log.exists() and len(json.loads(epoch_log.read_text() or "[]")) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # a preempted pod
    process.wait()
    assert 2 <= len(json.loads(epoch_log.read_text())) < 6, "the worker was not killed part-way"
    # Another worker does not take the killed worker's trial: it gets a new one.
    with search.oracle_turn(state) as oracle_dir:
        status, other = search.ask(config, oracle_dir, "worker0")
    assert status == search.RUNNING and other["trial_id"] == "1"
    # The restarted worker (same index, as a retried task) gets trial 0 back and finishes it from its last epoch.
    ran = search.work(digits_dir, config, 1, in_child=False, progress=lambda _: None)
    assert [r.trial_id for r in ran] == ["0"]
    assert [e["epoch"] for e in json.loads(epoch_log.read_text())] == list(range(6))


def test_grid_search_with_parallel_workers_runs_every_point_of_the_grid(digits_dir, tmp_path):
    # keras-tuner's grid oracle answers IDLE while it waits for a finished trial to extend the grid from;
    # a round-based fan-out took that for "done" and ran 4 of 9 points. Workers wait and ask again.
    state = tmp_path / "state"
    config = search.SearchConfig(search_algorithm="grid", max_trials=9, parallel_trials=2, trial_epochs=1,
                                 search_state_uri=str(state))
    workers = [subprocess.Popen([sys.executable, "-c", _worker_script(digits_dir, config, i)]) for i in range(2)]
    assert [w.wait(timeout=900) for w in workers] == [0, 0]
    told = search.told(state)
    points = {(r.values["learning_rate"], r.values["batch_size"]) for r in told}
    assert len(told) == 9 and len(points) == 9


@pytest.mark.parametrize("folds, trials", [(1, 5), (2, 3)])
def test_bayesian_search_never_repeats_a_configuration(digits_dir, tmp_path, folds, trials):
    # keras-tuner's Gaussian-process step proposes points already tried on a discrete space (6 trials gave 3
    # configurations); a repeat is replaced before it becomes a trial, so every trial is a new configuration.
    config = search.SearchConfig(search_algorithm="bayesian", max_trials=trials, parallel_trials=1, trial_epochs=1,
                                 folds=folds, search_state_uri=str(tmp_path))
    search.search(digits_dir, config, progress=lambda _: None)
    told = search.told(tmp_path)
    assert len(told) == trials
    assert len({json.dumps(r.values, sort_keys=True) for r in told}) == trials


def test_an_int_hyperparameter_reaches_the_users_function_as_an_int(digits_dir, tmp_path, monkeypatch):
    # Trial values travel as JSON between the oracle, the worker and its child process (and KFP), which can
    # turn 2 into 2.0; the user's function is called with the type the space declares.
    (tmp_path / "typed.py").write_text(textwrap.dedent("""
        from kftune.models import keras
        def build(input_shape, num_classes, num_layers=1, units=8):
            if type(num_layers) is not int or type(units) is not int:
                raise TypeError(f"got num_layers={num_layers!r}, units={units!r}")
            k = keras()
            x = inputs = k.Input(input_shape)
            x = k.layers.Flatten()(x)
            for _ in range(num_layers):
                x = k.layers.Dense(units, activation="relu")(x)
            return k.Model(inputs, k.layers.Dense(num_classes, activation="softmax")(x))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = search.SearchConfig(model="typed:build", search_space=(
        "{num_layers: {type: int, min: 1, max: 3}, units: {type: int, min: 8, max: 32, step: 8}}"))
    info = dataset.DatasetInfo.load(digits_dir)
    trial = json.loads(json.dumps({"num_layers": 2.0, "units": 16.0}))
    model = search.build_for_trial(trial, info, config)
    assert len([layer for layer in model.layers if layer.__class__.__name__ == "Dense"]) == 3


def _told(config, trial_id: str, status: str, curve: list[float]) -> search.TrialResult:
    return search.TrialResult(trial_id, {}, status=status, objective=curve[-1], epochs=len(curve),
                              curve=[[i + 1, v] for i, v in enumerate(curve)],
                              stopped_at=len(curve) if status == "STOPPED" else 0)


def test_median_stopping_stops_a_trial_below_the_median_of_completed_trials_at_that_epoch(tmp_path):
    # Optuna's MedianPruner over kftune's stored curves, here behind keras-tuner's random oracle.
    config = search.SearchConfig(search_algorithm="random", early_stopping="median", max_trials=6, trial_epochs=3,
                                 search_space=SPACE, search_state_uri=str(tmp_path))
    with search.oracle_turn(tmp_path) as state:
        ids = [search.ask(config, state, f"worker{i}")[1]["trial_id"] for i in range(5)]
    finished = []
    for trial_id, curve in zip(ids[:2], ([0.5, 0.7, 0.8], [0.3, 0.5, 0.6]), strict=True):
        with search.oracle_turn(tmp_path) as state:
            assert not search.report_epoch(config, state, trial_id, 1, curve[0])  # fewer than 3 completed: nobody stops
            assert not search.report_epoch(config, state, trial_id, 2, curve[1])
            finished.append(_told(config, trial_id, "COMPLETED", curve))
            search.tell(config, state, finished[-1:])
    with search.oracle_turn(tmp_path) as state:
        assert not search.report_epoch(config, state, ids[2], 1, 0.1)
        search.tell(config, state, [_told(config, ids[2], "COMPLETED", [0.1, 0.2, 0.3])])
        # Completed at epoch 1: 0.5, 0.3, 0.1; the median is 0.3.
        assert search.report_epoch(config, state, ids[3], 1, 0.2)
        assert not search.report_epoch(config, state, ids[4], 1, 0.4)
        # A trial stopped before its process was killed stops again at once when it resumes.
        assert search.report_epoch(config, state, ids[3], 1, 0.9)


def test_asha_promotes_the_top_third_at_each_rung_without_waiting(tmp_path):
    config = search.SearchConfig(search_algorithm="asha", max_trials=9, parallel_trials=3, trial_epochs=9,
                                 search_space=SPACE, search_state_uri=str(tmp_path))
    with search.oracle_turn(tmp_path) as state:
        ids = [search.ask(config, state, f"worker{i}")[1]["trial_id"] for i in range(4)]
        # Rung 0 is epoch 1: the first trial goes on alone; no worker waits for others to reach the rung.
        assert not search.report_epoch(config, state, ids[0], 1, 0.6)
        assert search.report_epoch(config, state, ids[1], 1, 0.5)      # 2 at the rung: only the best goes on
        assert search.report_epoch(config, state, ids[2], 1, 0.55)     # 3 at the rung: the top third, 1 trial
        assert not search.report_epoch(config, state, ids[3], 1, 0.7)  # a new best at the rung goes on
        # Rung 1 is epoch 3 (factor 3); epoch 2 is no rung.
        assert not search.report_epoch(config, state, ids[0], 2, 0.1)
        assert not search.report_epoch(config, state, ids[0], 3, 0.8)
        assert search.report_epoch(config, state, ids[3], 3, 0.75)


def test_an_asha_search_records_stopped_trials_with_their_last_score_and_draws_them(digits_dir, tmp_path):
    config = search.SearchConfig(search_algorithm="asha", max_trials=4, parallel_trials=1, trial_epochs=3,
                                 search_space=SPACE, search_state_uri=str(tmp_path / "state"))
    best = search.search(digits_dir, config, progress=lambda _: None)
    results = search.told(tmp_path / "state")
    stopped = [r for r in results if r.status == "STOPPED"]
    assert stopped and len(stopped) < len(results)
    for r in stopped:  # scored by the epoch it stopped at, whose weights it keeps
        assert r.stopped_at == r.epochs == 1 and r.objective == r.curve[-1][1] and not r.error
        assert (tmp_path / "state" / search.TRIALS_DIR / f"trial_{r.trial_id}" / search.WEIGHTS_FILE).exists()
    assert best.status == "COMPLETED" and best.epochs == 3
    epochs_spent = sum(r.epochs for r in results)
    assert epochs_spent < 3 * len(results)
    importances = search.importance(config, tmp_path / "state")
    assert set(importances) <= {"learning_rate", "batch_size", "dense_units", "optimizer"} and importances
    page = search.trials_page(config, results, importances)
    assert page.count("<img") == 3
    table = search.trials_markdown(config, best, results, importances)
    assert "stopped after epoch 1" in table and "Parameter importance (Optuna" in table


def test_a_tpe_worker_gets_its_own_unfinished_trial_back_and_another_algorithm_is_refused(tmp_path):
    config = search.SearchConfig(search_algorithm="tpe", max_trials=3, search_space=SPACE,
                                 search_state_uri=str(tmp_path))
    with search.oracle_turn(tmp_path) as state:
        first = search.ask(config, state, "worker0")
        second = search.ask(config, state, "worker1")
        assert search.ask(config, state, "worker0") == first and second[1]["trial_id"] != first[1]["trial_id"]
        search.tell(config, state, [search.TrialResult(first[1]["trial_id"], {}, objective=0.5, curve=[[3, 0.5]])])
        assert search.ask(config, state, "worker0")[1]["trial_id"] == "2"
        assert search.ask(config, state, "worker0")[1]["trial_id"] == "2"
        assert search.ask(config, state, "worker2")[0] == search.STOPPED  # all 3 handed out: no waiting
    other = search.SearchConfig(search_algorithm="bayesian", max_trials=3, search_space=SPACE,
                                search_state_uri=str(tmp_path))
    with pytest.raises(InputError, match=r"holds a search run with search_algorithm=tpe, which "
                                         r"search_algorithm=bayesian cannot continue: set search_algorithm=tpe"):
        with search.oracle_turn(tmp_path) as state:
            search.ask(other, state, "worker0")

