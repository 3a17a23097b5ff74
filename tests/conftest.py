"""Shared fixtures: tiny real data built in code, real trained models, a real GCS emulator."""

import os
import random
import socket
import uuid

import numpy as np
import pytest

import kftune  # noqa: F401 - selects tf-keras before anything imports TensorFlow


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The bundled digits, ingested at 16x16: real data, small enough for quick training."""
    from kftune import dataset

    folder = tmp_path_factory.mktemp("digits")
    dataset.ingest(dataset.IngestConfig(image_size=16), folder, progress=lambda _: None)
    return folder


@pytest.fixture(scope="session")
def trained_model_dir(digits_dir, tmp_path_factory):
    """A small CNN trained for a few epochs on ``digits_dir``, saved as the steps save models."""
    import tensorflow as tf

    from kftune import dataset, models

    tf.keras.utils.set_random_seed(0)
    info = dataset.DatasetInfo.load(digits_dir)
    model = models.compile_model(models.small_cnn(info.shape, info.num_classes), info.num_classes, learning_rate=3e-3)
    x, y = dataset.load_arrays(digits_dir, "train")
    model.fit(x.astype("float32"), y, epochs=4, batch_size=32, verbose=0)
    folder = tmp_path_factory.mktemp("model")
    return models.save(
        model,
        folder,
        models.ModelMeta(family="small_cnn", class_names=info.class_names, input_shape=list(info.shape),
                         hyperparameters={"learning_rate": 3e-3, "batch_size": 32}, stage="baseline"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real GCS API server (gcp-storage-emulator) on loopback; google-cloud-storage talks to it."""
    from gcp_storage_emulator.server import create_server

    from kftune import storage

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    storage._client.cache_clear()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        storage._client.cache_clear()


@pytest.fixture
def bucket(gcs_emulator):
    """A fresh, empty bucket on the emulator; yields its name."""
    from kftune import storage

    name = f"kftune-test-{uuid.uuid4().hex[:12]}"
    storage._client().create_bucket(name)
    return name


@pytest.fixture
def fault_proxy(gcs_emulator, monkeypatch):
    """Starts a tests/faultproxy.py FaultProxy in front of the emulator and points kftune's client at it.

    ``start(schedule, **options)`` returns the proxy; each call starts another
    and points the client at the newest.
    """
    from faultproxy import FaultProxy

    from kftune import storage

    started = []

    def start(schedule: dict[str, list[str]], **options) -> FaultProxy:
        server = FaultProxy(gcs_emulator, schedule, **options)
        started.append(server)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        storage._client.cache_clear()
        return server

    yield start
    for server in started:
        server.close()
    storage._client.cache_clear()


@pytest.fixture
def stored_gcs(gcs_emulator):
    """A client that talks to the emulator itself, past any proxy: what is really stored."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    return gcs.Client(project="direct", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_emulator})


# A whole pipeline small enough for the suite: two parallel search workers, every stage.
SMALL = {
    "image_size": 16, "max_trials": 3, "parallel_trials": 2, "trial_epochs": 2,
    "finetune_epochs": 2, "prune_epochs": 1, "target_sparsity": 0.5, "max_accuracy_drop": 0.2,
}


@pytest.fixture(scope="session")
def _local_run_and_console(tmp_path_factory):
    import io

    from pipelines import cli

    root = tmp_path_factory.mktemp("local-run")
    console = io.StringIO()
    run_dir, table = cli.run_local({**SMALL, "export_destination": str(root / "exports"), "export_version": "1"},
                                   root / "runs", out=console)
    return (run_dir, table, root / "exports"), console.getvalue()


@pytest.fixture(scope="session")
def local_run(_local_run_and_console):
    """One real ``kftune run-local`` of SMALL, shared by the tests that read its artifacts:
    (run folder, summary table, export destination)."""
    return _local_run_and_console[0]


@pytest.fixture(scope="session")
def gate_failed_run(tmp_path_factory):
    """The suite's second real run: SMALL with min_accuracy=1.0, so nothing passes the gate;
    (run folder, summary table, export destination). Shared so that reading it costs no other run."""
    from pipelines import cli

    root = tmp_path_factory.mktemp("gate-failed")
    run_dir, table = cli.run_local({**SMALL, "min_accuracy": 1.0, "export_destination": str(root / "exports")},
                                   root / "runs")
    return run_dir, table, root / "exports"


@pytest.fixture(scope="session")
def local_run_console(_local_run_and_console):
    """What that run printed while it ran (the summary table aside)."""
    return _local_run_and_console[1]
