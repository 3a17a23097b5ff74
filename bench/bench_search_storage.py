"""Search state traffic: the bytes each search step moves through GCS, as the number of trials grows.

Runs ``search.work`` (one worker, trials in this process) against a GCS emulator
(gcp-storage-emulator on loopback) behind a loopback proxy that counts the HTTP
bytes of every request (request bodies up, response bodies down). The model is
a user model (``module:function``) with a ~2 MB Dense layer, so that every trial
writes a multi-MB checkpoint; each trial trains 1 epoch on the bundled digits at
16x16. For N = 4, 16, 64 trials it prints the bytes and requests per oracle turn
(ask, tell), the bytes per trial (its own folder's sync and reads) and of the
result step (``save_best_model``), with ratios against N = 4, and all that is
stored under the state URI at the end (what a step that downloaded everything
would move). Then 16 trials of up to 3 epochs twice, random search and asha,
for the oracle turns an early-stopping search takes after each epoch.
The proxy cuts listings to their ``maxResults``, which GCS honours and the
emulator ignores (without that, every one-object bucket check would fetch the
metadata of every object in the bucket, checkpoints included).

    .venv/bin/python bench/bench_search_storage.py [--quick]     # --quick: N = 4 and 16 only
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import kftune  # noqa: E402, F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, report, search, storage  # noqa: E402
from kftune.search import oracles, worker  # noqa: E402

BUCKET = "bench"
UNITS = 640  # 768 inputs (16x16x3) x 640 units x 4 bytes: a 2.0 MB Dense kernel
MODEL_MODULE = f'''
from kftune import models

def build(input_shape, num_classes, **_):
    k = models.keras()
    inputs = k.Input(shape=input_shape)
    x = k.layers.Rescaling(1.0 / 255.0)(k.layers.Flatten()(inputs))
    x = k.layers.Dense({UNITS}, activation="relu", name="big")(x)
    units, activation, _ = models.output_head(num_classes)
    return k.Model(inputs, k.layers.Dense(units, activation=activation)(x))
'''
SPACE = "{learning_rate: {type: float, min: 0.0001, max: 0.003, sampling: log}, batch_size: {type: choice, values: [32, 64]}}"


class CountingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to ``upstream`` and counts the body bytes each way."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.lock = threading.Lock()
        self.up = self.down = self.requests = self.trimmed = 0
        super().__init__(("127.0.0.1", 0), _Forward)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def total(self) -> int:
        with self.lock:
            return self.up + self.down


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: Nagle would hold the body ~40 ms
    _HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

    def _any(self) -> None:
        assert "chunked" not in self.headers.get("Transfer-Encoding", ""), "chunked bodies are not counted"
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = self.server.upstream
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        try:
            # The Host header goes on as it came: the emulator builds mediaLink URLs from it, and
            # downloads through those must come back through this proxy too.
            headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            status, answer, reply_headers = response.status, response.read(), response.getheaders()
        finally:
            connection.close()
        answer = self._as_gcs_lists(answer) if status == 200 and self.command == "GET" else answer
        with self.server.lock:
            self.server.up += len(body)
            self.server.down += len(answer)
            self.server.requests += 1
        self.send_response(status)
        for key, value in reply_headers:
            if key.lower() not in self._HOP | {"host"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def _as_gcs_lists(self, answer: bytes) -> bytes:
        """A listing cut to ``maxResults`` items, as GCS sends it: the emulator ignores maxResults and answers
        kftune's one-object bucket check (``storage._bucket``) with the metadata of every object in the bucket."""
        parts = urlsplit(self.path)
        most = parse_qs(parts.query).get("maxResults")
        if not most or not re.fullmatch(r"/storage/v1/b/[^/]+/o", parts.path):
            return answer
        listing = json.loads(answer)
        if len(listing.get("items", [])) <= int(most[0]):
            return answer
        listing["items"] = listing["items"][: int(most[0])]
        with self.server.lock:
            self.server.trimmed += 1
        return json.dumps(listing).encode()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

    def log_message(self, *args) -> None:  # quiet
        pass


def start_gcs():
    """(emulator, proxy): the emulator on a free loopback port, the counting proxy in front, the client pointed
    at the proxy. Stop both when done: the emulator's thread would keep the process alive."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emulator = create_server("127.0.0.1", port, in_memory=True)
    emulator.start()
    proxy = CountingProxy(f"http://127.0.0.1:{port}")
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
    storage._client.cache_clear()
    storage._client().create_bucket(BUCKET)
    return emulator, proxy


class Meter:
    """Wraps the search's steps so that each records the bytes the proxy counted while it ran."""

    def __init__(self, proxy: CountingProxy):
        self.proxy = proxy
        self.turns: list[tuple[str, int, int]] = []  # ("ask" or "tell", bytes, requests)
        self.trials: list[int] = []
        self._verb = ""
        # The names search.work calls, in the module that calls them (kftune.search.worker).
        real_turn, real_trial, real_ask, real_tell = (worker.oracle_turn, worker.run_stored_trial, worker.ask,
                                                      worker.tell)
        real_epoch = oracles.report_epoch

        @contextlib.contextmanager
        def turn(state_uri):
            before, requests = proxy.total(), proxy.requests
            with real_turn(state_uri) as oracle_dir:
                yield oracle_dir
            self.turns.append((self._verb, proxy.total() - before, proxy.requests - requests))

        def trial(*args, **kwargs):
            before = proxy.total()
            result = real_trial(*args, **kwargs)
            self.trials.append(proxy.total() - before)
            return result

        def ask(*args, **kwargs):
            self._verb = "ask"
            return real_ask(*args, **kwargs)

        def tell(*args, **kwargs):
            self._verb = "tell"
            return real_tell(*args, **kwargs)

        def epoch(*args, **kwargs):
            self._verb = "epoch"
            return real_epoch(*args, **kwargs)

        worker.oracle_turn, worker.run_stored_trial, worker.ask, worker.tell = turn, trial, ask, tell
        # A trial of an early-stopping search takes a turn after each epoch (kftune.search.trials calls these
        # through the oracles module).
        oracles.oracle_turn, oracles.report_epoch = turn, epoch

    def reset(self) -> None:
        self.turns, self.trials = [], []


def state_bytes(prefix: str) -> tuple[int, int]:
    """(bytes, objects) under ``gs://BUCKET/prefix/``: what a step that downloaded everything would move."""
    blobs = list(storage._client().bucket(BUCKET).list_blobs(prefix=f"{prefix}/"))
    return sum(b.size for b in blobs), len(blobs)


def measure(data: Path, n: int, meter: Meter, workdir: Path, algorithm: str = "random", epochs: int = 1) -> dict:
    config = search.SearchConfig(search_space=SPACE, search_algorithm=algorithm, max_trials=n, parallel_trials=1,
                                 trial_epochs=epochs, seed=0, model="bench_big_dense:build",
                                 search_state_uri=f"gs://{BUCKET}/state-{algorithm}-{epochs}-{n}")
    meter.reset()
    started = time.perf_counter()
    search.work(data, config, in_child=False, progress=lambda _: None)
    before = meter.proxy.total()
    winner, _ = search.save_best_model(data, config, workdir / f"model-{n}")
    result = meter.proxy.total() - before
    seconds = time.perf_counter() - started
    # Epoch turns happen inside a trial, so the trial's bytes hold them: they are counted there only.
    ends = [(b, r) for v, b, r in meter.turns if v != "epoch"]
    turns, requests = [b for b, _ in ends], [r for _, r in ends]
    asks, tells = [b for v, b, _ in meter.turns if v == "ask"], [b for v, b, _ in meter.turns if v == "tell"]
    epoch_turns = [(b, r) for v, b, r in meter.turns if v == "epoch"]
    old, objects = state_bytes(f"state-{algorithm}-{epochs}-{n}")
    return {"n": n, "algorithm": algorithm, "epochs": epochs, "turn_mean": sum(turns) / len(turns), "turn_max": max(turns),
            "turn_requests": sum(requests) / len(requests), "ask": sum(asks) / len(asks),
            "tell": sum(tells) / len(tells), "trial": sum(meter.trials) / len(meter.trials), "result": result,
            "total": sum(turns) + sum(meter.trials) + result, "old": old, "objects": objects, "seconds": seconds,
            "best": winner.objective, "epoch_turns": len(epoch_turns),
            "epoch_bytes": sum(b for b, _ in epoch_turns), "epoch_requests": sum(r for _, r in epoch_turns)}


def epoch_table(plain: dict, asha: dict) -> str:
    """Per-epoch oracle turns of an early-stopping search beside the same search without them."""
    rows = []
    for r in (plain, asha):
        turns = r["epoch_turns"]
        rows.append([f"{r['algorithm']}, {r['n']} trials of up to {r['epochs']} epochs", f"{turns}",
                     f"{r['epoch_bytes'] / turns:,.0f}" if turns else "-",
                     f"{r['epoch_requests'] / turns:.1f}" if turns else "-",
                     f"{r['epoch_bytes']:,}", f"{r['total']:,}", f"{r['total'] / plain['total']:.2f}x"])
    return report.markdown_table(
        ["search", "epoch turns", "mean bytes per epoch turn", "requests per epoch turn", "bytes in epoch turns",
         "total bytes", "total vs random"], rows)


def table(rows: list[dict]) -> str:
    base = rows[0]

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:,.0f} ({row[key] / base[key]:.2f}x)"
    lines = [[r["n"], cell(r, "turn_mean"), cell(r, "turn_max"), f"{r['turn_requests']:.1f}",
              f"{r['ask']:,.0f} / {r['tell']:,.0f}",
              cell(r, "trial"), cell(r, "result"), f"{r['total']:,}", f"{r['old']:,} ({r['objects']} objects)"]
             for r in rows]
    return report.markdown_table(
        ["N trials", "mean bytes per oracle turn (vs N=4)", "max bytes per oracle turn", "requests per oracle turn",
         "mean ask / tell",
         "mean bytes per trial", "result step bytes", "total bytes",
         "everything under the state URI at the end"], lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 4 and 16 only")
    sizes = (4, 16) if parser.parse_args().quick else (4, 16, 64)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bench_big_dense.py").write_text(MODEL_MODULE)
        sys.path.insert(0, str(work))
        data = work / "digits"
        dataset.ingest(dataset.IngestConfig(image_size=16), data, progress=lambda _: None)
        emulator, proxy = start_gcs()
        meter, rows = Meter(proxy), []
        try:
            for n in sizes:
                rows.append(measure(data, n, meter, work))
                # Progress only: bytes are this benchmark's figures, not time (one run is not a timing).
                print(f"N={n}: {rows[-1]['seconds']:.0f} s, best val_accuracy {rows[-1]['best']:.4f}, "
                      f"{proxy.requests:,} requests so far", file=sys.stderr, flush=True)
            # Early stopping (asha, median) takes an oracle turn after every epoch: what that costs in
            # traffic, beside random search over the same space and epochs (no turn between epochs).
            epoch_rows = []
            for algorithm in ("random", "asha"):
                epoch_rows.append(measure(data, 16, meter, work, algorithm=algorithm, epochs=3))
                print(f"{algorithm}, 16 trials of up to 3 epochs: {epoch_rows[-1]['seconds']:.0f} s",
                      file=sys.stderr, flush=True)
        finally:
            proxy.shutdown()
            emulator.stop()
    print()
    print(table(rows))
    print()
    print(epoch_table(*epoch_rows))
    print(f"bytes: HTTP bodies (up + down) through the proxy, {proxy.trimmed:,} listings cut to maxResults "
          "(byte counts: one run; no time is reported)")
    print(f"run time {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
