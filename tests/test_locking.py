"""The storage lock the search workers take turns through: local files under contention, and GCS."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kftune import locking, storage
from kftune.errors import StorageError


def test_processes_at_once_never_hold_the_local_lock_together(tmp_path):
    # Four processes read-modify-write one counter 25 times each; any overlap loses an increment.
    counter = tmp_path / "counter"
    counter.write_text("0")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from kftune import locking
        for _ in range(25):
            with locking.lock({str(tmp_path / "state.lock")!r}, poll=0.001):
                value = int(Path({str(counter)!r}).read_text())
                Path({str(counter)!r}).write_text(str(value + 1))
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [w.wait(timeout=120) for w in workers] == [0] * 4
    assert counter.read_text() == "100"
    assert not (tmp_path / "state.lock").exists()


def test_a_dead_holders_local_lock_is_taken_over_once_stale(tmp_path):
    path = tmp_path / "state.lock"
    path.write_text('{"holder": "a pod that was preempted"}')
    started = time.monotonic()
    with locking.lock(str(path), stale_after=0.3, poll=0.05):
        assert time.monotonic() - started >= 0.3
    assert not path.exists()


def test_a_lock_whose_holder_died_on_this_machine_is_taken_over_at_once(tmp_path):
    # kfp.local and single-machine runs: a killed worker's lock need not wait until it is stale.
    script = textwrap.dedent(f"""
        import os, signal
        from kftune import locking
        with locking.lock({str(tmp_path / "state.lock")!r}):
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == -9
    assert (tmp_path / "state.lock").exists()
    with locking.lock(str(tmp_path / "state.lock"), stale_after=3600, timeout=10):
        pass
    assert not list(tmp_path.iterdir())


def test_a_lock_held_too_long_is_one_clear_error(tmp_path):
    with locking.lock(str(tmp_path / "state.lock")):
        with pytest.raises(StorageError, match="stayed taken for 0 s: another search using the same search_state_uri"):
            with locking.lock(str(tmp_path / "state.lock"), timeout=0.2, stale_after=60):
                pass


def test_on_gcs_a_held_lock_blocks_the_next_holder_until_released(bucket, fault_proxy):
    # Through the fault proxy with no faults: it refuses a create whose ifGenerationMatch=0 fails, as GCS
    # does (the emulator alone would overwrite), so this is the request GCS itself arbitrates.
    proxy = fault_proxy({"api": ["ok"], "upload": ["ok"], "download": ["ok"]})
    uri = f"gs://{bucket}/state/oracle.lock"
    second_in = threading.Event()
    failed = []

    def second():
        try:
            with locking.lock(uri, poll=0.02, stale_after=60):
                second_in.set()
        except Exception as e:  # noqa: BLE001 - a thread's exception is otherwise only printed: carry it to the assert
            failed.append(e)

    with locking.lock(uri, poll=0.02):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)
        assert not second_in.is_set(), "two holders of one lock"
        assert proxy.preconditions_refused >= 1
    thread.join(timeout=30)
    left = storage._client().bucket(bucket).get_blob("state/oracle.lock")
    assert second_in.is_set(), (failed, left and left.download_as_text(), proxy.log[-6:])
    assert left is None


def test_on_gcs_a_lock_released_between_its_two_reads_is_taken_not_an_error(bucket, fault_proxy, monkeypatch):
    """The waiter reads the lock's metadata, then its content; the holder released it in between.

    The content read then finds no such generation. It was raised out of the waiter (a search worker
    stopped by its neighbour's release; seen once in CI): the lock is free, so the waiter tries again.
    """
    from google.cloud.storage import Blob

    # The proxy refuses a create whose ifGenerationMatch=0 fails, as GCS does (the emulator would overwrite).
    proxy = fault_proxy({"api": ["ok"], "upload": ["ok"], "download": ["ok"]})
    uri = f"gs://{bucket}/state/oracle.lock"
    holder = locking.lock(uri, poll=0.02).__enter__()
    read = Blob.download_as_text
    released = []

    def release_first(self, *args, **kwargs):
        if not released:
            released.append(holder.__exit__(None, None, None))
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Blob, "download_as_text", release_first)
    with locking.lock(uri, poll=0.02, stale_after=60, timeout=30):
        assert released and proxy.preconditions_refused >= 1
        assert storage._client().bucket(bucket).get_blob("state/oracle.lock") is not None
    assert storage._client().bucket(bucket).get_blob("state/oracle.lock") is None


def test_on_gcs_a_dead_holders_lock_is_taken_over_once_stale(bucket):
    storage._client().bucket(bucket).blob("state/oracle.lock").upload_from_string('{"holder": "gone"}')
    time.sleep(1.2)
    with locking.lock(f"gs://{bucket}/state/oracle.lock", stale_after=1.0, poll=0.02):
        pass
    assert storage._client().bucket(bucket).get_blob("state/oracle.lock") is None
