"""The oracle's stored state survives a kill at any moment of an oracle turn."""

import gzip
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kftune import search, search_state, storage
from kftune.errors import StorageError

ROOT = Path(__file__).resolve().parents[1]
SPACE = "{dense_units: {type: choice, values: [8, 16, 32]}}"


def _config(state) -> search.SearchConfig:
    return search.SearchConfig(search_algorithm="random", max_trials=3, parallel_trials=2, trial_epochs=1,
                               search_space=SPACE, search_state_uri=str(state))


def _ask(config, worker: str) -> dict:
    with search.oracle_turn(config.search_state_uri) as oracle_dir:
        status, trial = search.ask(config, oracle_dir, worker)
    assert status == search.RUNNING
    return trial


def test_a_worker_killed_while_the_oracle_writes_leaves_the_state_as_it_was(tmp_path):
    config = _config(tmp_path / "state")
    first = _ask(config, "worker0")
    stored = (tmp_path / "state" / search_state.STATE_FILE).read_bytes()
    # The worst moment: keras-tuner has rewritten oracle.json in the turn's folder and left it empty, as a
    # process killed inside its non-atomic write does; then the process dies before the turn ends.
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from kftune import search
        config = search.SearchConfig(**{config.__dict__!r})
        with search.oracle_turn(config.search_state_uri) as oracle_dir:
            search.ask(config, oracle_dir, "worker1")
            (Path(oracle_dir) / search.PROJECT / "oracle.json").write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "state" / search_state.STATE_FILE).read_bytes() == stored
    # The search goes on: worker0 gets its own unfinished trial back, worker1 a new one.
    assert _ask(config, "worker0") == first
    assert _ask(config, "worker1")["trial_id"] == "1"


def test_a_turn_that_fails_stores_nothing(tmp_path):
    config = _config(tmp_path)
    _ask(config, "worker0")
    stored = (tmp_path / search_state.STATE_FILE).read_bytes()
    with pytest.raises(RuntimeError), search.oracle_turn(tmp_path) as oracle_dir:
        search.ask(config, oracle_dir, "worker1")
        raise RuntimeError("the worker failed mid-turn")
    assert (tmp_path / search_state.STATE_FILE).read_bytes() == stored
    assert not (tmp_path / search.LOCK_FILE).exists()


def test_a_turn_that_changes_nothing_writes_nothing(tmp_path):
    _ask(_config(tmp_path), "worker0")
    path = tmp_path / search_state.STATE_FILE
    before = path.stat().st_mtime_ns
    with search.oracle_turn(tmp_path):
        pass
    assert path.stat().st_mtime_ns == before


def test_a_state_changed_by_something_else_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / search_state.STATE_FILE
    for damaged in (b"", b"not gzip", gzip.compress(b'{"format": "other"}')):
        path.write_bytes(damaged)
        with pytest.raises(StorageError, match=r"oracle-state\.json\.gz` is not a search state kftune can read.*"
                                               r"set search_state_uri to a new folder"):
            search.told(tmp_path)
        assert path.read_bytes() == damaged  # kept for the user to restore or inspect


def test_the_folder_layout_of_kftune_0_1_is_read_and_left_as_it_was(tmp_path):
    config = _config(tmp_path)
    first = _ask(config, "worker0")
    # kftune 0.1 kept keras-tuner's files under oracle/, one file each.
    old = tmp_path / search_state.FOLDER_LAYOUT
    search_state.unpack((tmp_path / search_state.STATE_FILE).read_bytes(), old, "test")
    (tmp_path / search_state.STATE_FILE).unlink()
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert _ask(config, "worker0") == first
    assert _ask(config, "worker1")["trial_id"] == "1"
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    shutil.rmtree(old)  # from here on the document alone holds the state
    assert _ask(config, "worker1")["trial_id"] == "1"


def test_on_gcs_a_turn_reads_and_writes_one_object(bucket):
    root = f"gs://{bucket}/state"
    config = _config(root)
    _ask(config, "worker0")
    _ask(config, "worker1")
    names = sorted(b.name for b in storage._client().list_blobs(bucket))
    assert names == [f"state/{search_state.STATE_FILE}"]
    document = json.loads(gzip.decompress(storage.read_bytes(f"{root}/{search_state.STATE_FILE}")))
    assert {f"{search.PROJECT}/oracle.json", f"{search.PROJECT}/trial_0/trial.json",
            f"{search.PROJECT}/trial_1/trial.json"} <= set(document["files"])
