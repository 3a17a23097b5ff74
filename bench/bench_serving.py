"""Serving throughput and latency: ``kftune serve`` (KServe's model server) beside a naive per-request model.predict.

    nice -n 5 .venv/bin/python bench/bench_serving.py            # about 4 min on a 2-core VM
    nice -n 5 .venv/bin/python bench/bench_serving.py --quick    # 1-2 min check of the script

Ingests the bundled digits with IngestConfig() defaults (32x32 RGB), trains
kftune's small_cnn (bench_prune.train_dense), and makes four versions of it
the way bench/bench_prune.py does, each exported with kftune.export and served
by its own ``kftune serve`` process on loopback:

* dense: the trained model (SavedModel, runtime tensorflow);
* magnitude: pruned to 80% sparsity with kftune.prune (stripped: the same dense
  shapes with zeros, so the same work per image);
* structured: 60% of the filters and units removed (prune_method=structured);
* int8: the dense model quantized to full int8 TFLite, run through LiteRT
  (runtime kftune).

Beside them, the naive baseline: a minimal ``http.server`` handler (a thread per
connection) that decodes the JPEG with Pillow and calls the Keras model's
``model.predict`` for each request, as a first Flask-style server would.

Every request is one real JPEG of the test split (32x32), V1 JSON (``{"instances":
[{"image_bytes": {"b64": ...}}]}``), from client threads in this process on
persistent HTTP/1.1 connections. At concurrency 1 (one client thread) and 8
(eight), each server answers a fixed number of requests per repeat; repeats are
interleaved over the servers (the order rotates each repeat) after an
unmeasured warm-up of each. Every answer must be 200 with one prediction, or the
run stops. The table gives requests per second and each repeat's p50 and p99
latency, median of the repeats with [min-max], and the ratio of the medians to
the naive baseline (req/s: this / naive; p50: naive / this, so higher is better
in both).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import timing

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, export, models, quantize, report

ROOT = Path(__file__).resolve().parents[1]
NAME = "digits"
PATH = f"/v1/models/{NAME}:predict"
SERVERS = {
    "naive": "naive: http.server + Pillow + model.predict (dense Keras)",
    "dense": "kftune serve: dense (SavedModel)",
    "magnitude": "kftune serve: magnitude-pruned 80% (SavedModel)",
    "structured": "kftune serve: structured-pruned 60% (SavedModel)",
    "int8": "kftune serve: dense int8 (TFLite, LiteRT)",
}


# ---------------------------------------------------------------- the naive baseline, in its own process


def naive_server(model_dir: str, port: str) -> None:
    """Serves ``model_dir``'s Keras model the naive way: decode with Pillow, ``model.predict`` per request."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    model, meta = models.load(model_dir)
    size = int(meta.input_shape[0])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the clients use it against kftune serve
        # Headers and body go out in two writes: with Nagle's algorithm on, the body waits for the
        # client's delayed ACK of the headers (40 ms a request on Linux), which would not be predict's cost.
        disable_nagle_algorithm = True

        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer(200, {"ready": True})

        def do_POST(self):  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["image_bytes"]["b64"])))
                                          .convert("RGB").resize((size, size)), np.float32)
                               for i in body["instances"]])
            probabilities = model.predict(images, verbose=0)
            self._answer(200, {"predictions": [{"labels": [meta.class_names[int(np.argmax(p))]],
                                                "scores": [float(np.max(p))]} for p in probabilities]})

        def _answer(self, status: int, document: dict) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    model.predict(np.zeros((1, size, size, 3), np.float32), verbose=0)  # Keras builds its predict function once
    ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()


# ---------------------------------------------------------------- the versions


def build_versions(tmp: Path, seed: int, epochs: int) -> tuple[Path, dict[str, str], Path]:
    """The data, the four exported versions (key -> version folder) and the dense model's folder."""
    from bench_prune import train_dense

    from kftune import prune as pr

    data = tmp / "data"
    dataset.ingest(dataset.IngestConfig(), data, progress=lambda _: None)
    train_dense(data, tmp / "dense", seed, epochs)
    for key, config in (
        ("magnitude", pr.PruneConfig(target_sparsity=0.8, prune_epochs=2, prune_quantize="", seed=seed)),
        ("structured", pr.PruneConfig(prune_method="structured", target_sparsity=0.6, prune_epochs=2,
                                      prune_quantize="", seed=seed)),
    ):
        pr.prune(data, tmp / "dense", config, tmp / key, progress=lambda _: None, verbose=0)
    shutil.copytree(tmp / "dense", tmp / "int8")
    quantize.quantize(models.load(tmp / "dense")[0], ["int8"], tmp / "int8", dataset.load_split(data, "validation"))
    versions = {}
    for key in ("dense", "magnitude", "structured", "int8"):
        metadata = {"source_run": f"bench-{key}"}
        if key == "int8":
            metadata.update(candidate="quantized", model_file=quantize.file_name("int8"))
        versions[key], _ = export.export(tmp / key, str(tmp / "exports" / key), metadata, dataset_dir=data)
    return data, versions, tmp / "dense"


# ---------------------------------------------------------------- servers and clients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int, path: str) -> bool:
    with contextlib.suppress(OSError):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", path)
        ok = connection.getresponse().status == 200
        connection.close()
        return ok
    return False


@contextlib.contextmanager
def started(servers: dict[str, list[str]], logs: Path):
    """Starts each command (its port is the last argument) one after another, each ready before the next; yields
    key -> port, and stops them all."""
    processes = {}
    try:
        ports = {}
        for key, command in servers.items():
            port = _free_port()
            with open(logs / f"{key}.log", "wb") as out:
                processes[key] = subprocess.Popen([*command, str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while not _ready(port, "/v2/health/ready" if key != "naive" else "/"):
                if processes[key].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{key} did not start:\n{(logs / f'{key}.log').read_text()[-3000:]}")
                time.sleep(0.25)
            ports[key] = port
        yield ports
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def load(port: int, bodies: list[bytes], concurrency: int, total: int) -> tuple[float, list[float]]:
    """``total`` requests from ``concurrency`` threads, each on its own keep-alive connection: the wall time and
    every request's latency (seconds). Stops the run on any answer but 200 with one prediction."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        try:
            for r in range(t, total, concurrency):
                began = time.perf_counter()
                connection.request("POST", PATH, body=bodies[r % len(bodies)],
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                mine.append(time.perf_counter() - began)
                if response.status != 200 or len(json.loads(answer)["predictions"]) != 1:
                    with lock:
                        failures.append(f"{response.status} {answer[:200]!r}")
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(t,)) for t in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if failures or len(latencies) != total:
        raise SystemExit(f"port {port}: {len(failures)} failed, {len(latencies)} of {total} answered: {failures[:3]}")
    return wall, latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="train less, 1 repeat of fewer requests (checks the script)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per server, concurrency and repeat (default: 100 at concurrency 1, 200 at 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naive", nargs=2, metavar=("MODEL_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive:
        naive_server(*args.naive)
        return 0
    import tensorflow as tf

    repeats = 1 if args.quick else args.repeats
    per_concurrency = {1: args.requests or (16 if args.quick else 100), 8: args.requests or (48 if args.quick else 200)}
    began = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, versions, dense_dir = build_versions(tmp, args.seed, epochs=3 if args.quick else 12)
        x_test, _ = dataset.load_arrays(data, "test")
        bodies = [json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(
            tf.io.encode_jpeg(image).numpy()).decode()}}]}).encode() for image in x_test[:64]]
        built = time.time() - began
        commands = {"naive": [sys.executable, __file__, "--naive", str(dense_dir)]}
        commands.update({key: [sys.executable, "-m", "pipelines.cli", "serve", str(uri), "--host", "127.0.0.1",
                               "--name", NAME, "--port"] for key, uri in versions.items()})
        (tmp / "logs").mkdir()
        results = {key: {c: {"rps": [], "p50": [], "p99": []} for c in per_concurrency} for key in commands}
        with started(commands, tmp / "logs") as ports:
            for port in ports.values():  # warm-up, not measured: first calls trace, allocate, fill caches
                load(port, bodies, 8, 32)
                load(port, bodies, 1, 8)
            order = list(commands)
            for repeat in range(repeats):
                for concurrency, total in per_concurrency.items():
                    for key in order[repeat % len(order):] + order[:repeat % len(order)]:
                        wall, latencies = load(ports[key], bodies, concurrency, total)
                        ms = np.array(latencies) * 1000
                        results[key][concurrency]["rps"].append(total / wall)
                        results[key][concurrency]["p50"].append(float(np.percentile(ms, 50)))
                        results[key][concurrency]["p99"].append(float(np.percentile(ms, 99)))
                print(f"repeat {repeat + 1}/{repeats} done, {time.time() - began:.0f} s", flush=True)

    naive = results["naive"]
    rows = []
    for key, by_concurrency in results.items():
        row = [SERVERS[key]]
        for concurrency in per_concurrency:
            m = by_concurrency[concurrency]
            row += [timing.spread(m["rps"], "{:.0f}"), timing.spread(m["p50"], "{:.1f}"), timing.spread(m["p99"], "{:.1f}")]
        for concurrency in per_concurrency:
            m, n = by_concurrency[concurrency], naive[concurrency]
            row.append(f"{statistics.median(m['rps']) / statistics.median(n['rps']):.2f}x / "
                       f"{statistics.median(n['p50']) / statistics.median(m['p50']):.2f}x")
        rows.append(row)
    print()
    print(report.markdown_table(
        ["server", "c1 req/s", "c1 p50 ms", "c1 p99 ms", "c8 req/s", "c8 p50 ms", "c8 p99 ms",
         "c1 vs naive (req/s / p50)", "c8 vs naive (req/s / p50)"], rows))
    print(f"\n{repeats} repeats of {per_concurrency[1]} requests at concurrency 1 (1 client thread) and "
          f"{per_concurrency[8]} at 8 (8 client threads), interleaved, after a warm-up; kftune serve: 1 uvicorn "
          f"process, KServe's executor of min(32, cores + 4) = {min(32, (os.cpu_count() or 1) + 4)} threads; "
          f"naive: a thread per connection. {os.cpu_count()} cores, {platform.machine()}, TensorFlow "
          f"{version('tensorflow')}, kserve {version('kserve')}; build {built:.0f} s, whole run "
          f"{time.time() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
