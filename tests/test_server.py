"""``kftune serve`` and ``kftune predict``: a real KServe server in its own process on loopback, real image files,
a model trained on the digits and exported, as SavedModel and as int8 TFLite."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kftune import dataset, export, models, quantize, serving
from pipelines import cli

ROOT = Path(__file__).resolve().parent.parent
NAME = "digits"
STARTUP_DEADLINE_S = 180  # importing TensorFlow and KServe and loading the model, on a busy 2-core machine


# ---------------------------------------------------------------- what is served


@pytest.fixture(scope="module")
def base(trained_model_dir, digits_dir, tmp_path_factory) -> Path:
    """A model base holding version 1 (the SavedModel, runtime tensorflow) and version 2 (the same model as int8
    TFLite, runtime kftune: what `kftune serve` runs through LiteRT)."""
    folder = tmp_path_factory.mktemp("exports")
    export.export(trained_model_dir, str(folder), {"source_run": "serve-dense"}, dataset_dir=digits_dir)
    quantized = tmp_path_factory.mktemp("quantized") / "model"
    shutil.copytree(trained_model_dir, quantized)
    quantize.quantize(models.load(quantized)[0], ["int8"], quantized, dataset.load_split(digits_dir, "validation"))
    export.export(quantized, str(folder), {"source_run": "serve-int8", "candidate": "quantized",
                                           "model_file": quantize.file_name("int8")}, dataset_dir=digits_dir)
    return folder


@pytest.fixture(scope="module")
def photos(digits_dir, tmp_path_factory) -> dict[str, Path]:
    """Test digits as real image files: JPEGs, a PNG, a grayscale JPEG and a JPEG at 40x40 (the model takes 16x16)."""
    import tensorflow as tf

    x, _ = dataset.load_arrays(digits_dir, "test")
    folder = tmp_path_factory.mktemp("photos")
    encoded = {f"{i}.jpg": tf.io.encode_jpeg(x[i]) for i in range(6)}
    encoded["6.png"] = tf.io.encode_png(x[6])
    encoded["7-gray.jpg"] = tf.io.encode_jpeg(tf.cast(tf.image.rgb_to_grayscale(x[7]), tf.uint8))
    encoded["8-40px.jpg"] = tf.io.encode_jpeg(tf.cast(tf.image.resize(x[8], (40, 40)), tf.uint8))
    files = {}
    for name, data in encoded.items():
        files[name] = folder / name
        files[name].write_bytes(data.numpy())
    return files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(uri: str | Path, log: Path):
    """``kftune serve uri`` in its own process on a free loopback port; yields (port, its log). Always stopped."""
    port = _free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(uri), "--host", "127.0.0.1",
                                    "--port", str(port), "--name", NAME], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"kftune serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if request(port, "GET", "/v2/health/ready")[0] == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"kftune serve was not ready in {STARTUP_DEADLINE_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield port, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    """Version 1 (the SavedModel) served on loopback: (port, log)."""
    with running(base / "1", tmp_path_factory.mktemp("server") / "serve.log") as served:
        yield served


# ---------------------------------------------------------------- requests


def request(port: int, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None,
            connection: http.client.HTTPConnection | None = None) -> tuple[int, dict | str]:
    """One request; the answer's status and its JSON (text when it is not JSON)."""
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    try:
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        if own:
            connection.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1_body(images: list[bytes], keys: list[str] | None = None) -> dict:
    return {"instances": [{"image_bytes": {"b64": b64(image)}, **({"key": keys[i]} if keys else {})}
                          for i, image in enumerate(images)]}


def v2_body(images: list[bytes], keys: list[str] | None = None) -> dict:
    inputs = [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(images)], "data": [b64(i) for i in images]}]
    if keys:
        inputs.append({"name": "key", "datatype": "BYTES", "shape": [len(keys)], "data": keys})
    return {"inputs": inputs}


def v2_outputs(answer: dict) -> dict[str, dict]:
    return {output["name"]: output for output in answer["outputs"]}


@pytest.fixture(scope="module")
def expected(base, photos) -> dict[str, str]:
    """Each photo's best label, as serving.Servable answers for the same bytes in this process."""
    servable = serving.Servable(base / "1")
    return {name: p.labels[0] for name, p in zip(photos, servable.predict([f.read_bytes() for f in photos.values()]),
                                                   strict=True)}


# ---------------------------------------------------------------- answers


def test_v1_and_v2_answer_class_names_as_the_servable_does(server, photos, expected):
    port, _ = server
    names, images = list(photos), [f.read_bytes() for f in photos.values()]
    classes = [str(i) for i in range(10)]

    status, answer = request(port, "POST", f"/v1/models/{NAME}:predict", v1_body(images, keys=names))
    assert status == 200, answer
    predictions = answer["predictions"]
    assert [p["key"] for p in predictions] == names
    assert {n: p["labels"][0] for n, p in zip(names, predictions, strict=True)} == expected
    for p in predictions:
        assert len(p["labels"]) == len(p["scores"]) == 5 and set(p["labels"]) <= set(classes)
        assert p["scores"] == sorted(p["scores"], reverse=True) and 0 < sum(p["scores"]) <= 1.0001

    status, answer = request(port, "POST", f"/v2/models/{NAME}/infer", v2_body(images, keys=names))
    assert status == 200, answer
    outputs = v2_outputs(answer)
    assert outputs["labels"]["datatype"] == "BYTES" and outputs["labels"]["shape"] == [len(images), 5]
    assert outputs["scores"]["datatype"] == "FP32" and outputs["scores"]["shape"] == [len(images), 5]
    labels = np.array(outputs["labels"]["data"]).reshape(len(images), 5)
    assert dict(zip(names, labels[:, 0].tolist(), strict=True)) == expected
    assert outputs["key"]["data"] == names
    scores = np.array(outputs["scores"]["data"]).reshape(len(images), 5)
    np.testing.assert_allclose(scores, [p["scores"] for p in predictions], atol=1e-5)

    # Without keys: no key in the answer.
    status, answer = request(port, "POST", f"/v1/models/{NAME}:predict", v1_body(images[:1]))
    assert status == 200 and "key" not in answer["predictions"][0], answer


def test_kserve_routes_list_the_model_and_its_tensors(server):
    port, log = server
    assert request(port, "GET", "/v1/models") == (200, {"models": [NAME]})
    assert request(port, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert request(port, "GET", f"/v2/models/{NAME}/ready")[0] == 200
    status, metadata = request(port, "GET", f"/v2/models/{NAME}")
    assert status == 200
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {"image_bytes": "BYTES", "key": "BYTES"}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == {
        "labels": ("BYTES", [-1, 5]), "scores": ("FP32", [-1, 5])}
    first = next(line for line in log.read_text().splitlines() if line.startswith("kftune:"))
    assert re.match(r"kftune: serving version 1 of `.*`: candidate baseline \(saved_model.pb, tensorflow\), 10 classes",
                    first), first


def test_the_int8_tflite_version_is_served_through_litert_from_the_base(base, photos, tmp_path):
    """The base names its newest complete version, 2: the int8 TFLite file, runtime kftune (LiteRT)."""
    assert export.read_metadata(base / "2")["serving"]["runtime"] == export.RUNTIME_TFLITE
    images = [f.read_bytes() for f in photos.values()]
    wanted = [p.labels[0] for p in serving.Servable(base / "2").predict(images)]
    with running(base, tmp_path / "serve.log") as (port, log):
        # kftune's first line (LiteRT's own "Created ... XNNPACK delegate" may come before it, on stderr).
        first = next(line for line in log.read_text().splitlines() if line.startswith("kftune:"))
        assert re.match(r"kftune: serving version 2 of .*candidate quantized \(model_int8.tflite, kftune\)", first), first
        status, answer = request(port, "POST", f"/v1/models/{NAME}:predict", v1_body(images))
        assert status == 200, answer
        assert [p["labels"][0] for p in answer["predictions"]] == wanted
        status, answer = request(port, "POST", f"/v2/models/{NAME}/infer", v2_body(images))
        assert status == 200, answer
        assert np.array(v2_outputs(answer)["labels"]["data"]).reshape(len(images), -1)[:, 0].tolist() == wanted


# ---------------------------------------------------------------- bad requests


def _bomb() -> bytes:
    """A real PNG whose header is rewritten to declare 10,000 x 10,000 pixels (a decompression bomb's trick)."""
    import struct

    import tensorflow as tf

    data = bytearray(tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy())
    data[16:24] = struct.pack(">II", 10_000, 10_000)
    return bytes(data)


def _binary_v2(image: bytes) -> tuple[bytes, dict]:
    """A V2 request in the binary tensor extension with the image's raw bytes (not base64) as its BYTES element."""
    import struct

    header = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(image)}}]}).encode()
    return header + struct.pack("<I", len(image)) + image, {"Content-Type": "application/octet-stream",
                                                            "Inference-Header-Content-Length": str(len(header))}


V1 = f"/v1/models/{NAME}:predict"
V2 = f"/v2/models/{NAME}/infer"
# (id, path, body from a JPEG's bytes, extra headers, status, what the one line says)
BAD_REQUESTS = [
    ("v1/not-an-image", V1, lambda j: v1_body([b"plain text, not a picture"]), None, 400,
     r"^image 0 is not an image kftune can decode \(.*\): send a JPEG, PNG, GIF or BMP file\.$"),
    ("v2/not-an-image", V2, lambda j: v2_body([j, b"GIF89a broken"]), None, 400, r"^image 1 is not an image kftune"),
    ("v1/empty-image", V1, lambda j: {"instances": [{"image_bytes": {"b64": ""}}]}, None, 400,
     r"^image 0 is empty: send the bytes of a JPEG, PNG, GIF or BMP file\.$"),
    ("v1/empty-instances", V1, lambda j: {"instances": []}, None, 400, r"^the request holds no images: send at least one"),
    ("v2/no-images", V2, lambda j: v2_body([]), None, 400, r"the request holds no images"),
    ("v1/batch-over-the-limit", V1, lambda j: v1_body([j] * (serving.MAX_BATCH + 1)), None, 400,
     rf"^the request holds {serving.MAX_BATCH + 1} images, over the limit of {serving.MAX_BATCH} a request: split it"),
    ("v2/batch-over-the-limit", V2, lambda j: v2_body([j] * (serving.MAX_BATCH + 1)), None, 400,
     rf"holds {serving.MAX_BATCH + 1} images, over the limit of {serving.MAX_BATCH}"),
    ("v1/no-instances", V1, lambda j: {"inputs": [b64(j)]}, None, 400, r'^the request has no "instances" \(it has keys'),
    ("v1/instances-not-a-list", V1, lambda j: {"instances": {"image_bytes": {"b64": b64(j)}}}, None, 400,
     r'"instances" to be a list'),  # KServe's own check (Model.validate) says it first
    ("v1/image-bytes-not-b64-object", V1, lambda j: {"instances": [{"image_bytes": b64(j)}]}, None, 400,
     r'^instance 0 has no "image_bytes": \{"b64": "..."\} \(got \{"image_bytes": str\}\)'),
    ("v1/bad-base64", V1, lambda j: {"instances": [{"image_bytes": {"b64": "not base64 at all!"}}]}, None, 400,
     r"^instance 0's image_bytes.b64 is not valid base64"),
    ("v1/key-not-a-string", V1, lambda j: {"instances": [{"image_bytes": {"b64": b64(j)}, "key": 7}]}, None, 400,
     r'"key" must be a string, not int'),
    ("v1/not-json", V1, lambda j: b"{instances: oops", None, 400, r"^the request body is not JSON \(.*\): send"),
    ("v2/not-json", V2, lambda j: b"{inputs: oops", None, 400, r"^the request body is not JSON: send"),
    ("v2/not-an-inference-request", V2, lambda j: {"inputs": [{"name": "image_bytes", "data": [b64(j)]}]}, None, 400,
     r"^the request body is not an Open Inference Protocol request \(inputs\.0\.shape: Field required\)"),
    ("v2/no-image-bytes-input", V2, lambda j: {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                                           "data": [b64(j)]}]}, None, 400,
     r"""^the request has no input named "image_bytes" \(it has \['images'\]\)"""),
    ("v2/wrong-datatype", V2, lambda j: {"inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": [1],
                                                     "data": [1.0]}]}, None, 400,
     r'input "image_bytes" must have datatype BYTES, not FP32'),
    ("v2/shape-not-matching-data", V2, lambda j: {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [3],
                                                              "data": [b64(j)]}]}, None, 400,
     r'input "image_bytes" has shape \[3\] but 1 values'),
    ("v2/keys-not-paired", V2, lambda j: v2_body([j, j], keys=["only-one"]), None, 400,
     r"the request has 1 keys for 2 images: give one key per image or none"),
    ("v2/raw-bytes-in-the-binary-extension", V2, lambda j: _binary_v2(j)[0], "binary", 400,
     r"^the request's tensors cannot be decoded \(its binary data holds bytes that are not UTF-8 text"),
    ("v1/decompression-bomb", V1, lambda j: v1_body([_bomb()]), None, 400,
     rf"^image 0 declares 100000000 pixels, over the limit of {serving.MAX_PIXELS}"),
    ("v1/unknown-model", "/v1/models/nope:predict", lambda j: v1_body([j]), None, 404, r"nope does not exist"),
    ("v2/unknown-model", "/v2/models/nope/infer", lambda j: v2_body([j]), None, 404, r"nope does not exist"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_with_one_line_and_the_server_goes_on(server, photos, case):
    port, _ = server
    _, path, make, headers, status, message = case
    jpeg = photos["0.jpg"].read_bytes()
    body = make(jpeg)
    if headers == "binary":
        headers = _binary_v2(jpeg)[1]
    got, answer = request(port, "POST", path, body, headers)
    assert got == status, answer
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert "\n" not in answer["error"] and re.search(message, answer["error"]), answer["error"]
    assert request(port, "POST", V1, v1_body([jpeg]))[0] == 200


def test_a_body_over_the_limit_is_refused_413_before_it_is_read(server, photos):
    from kftune import server as kserver

    port, _ = server
    limit = kserver.MAX_BODY_BYTES
    # Declared: refused on the headers, the body is never sent.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", V1)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10 * limit))
    connection.endheaders()
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 413 and response.getheader("connection") == "close"
    assert re.match(rf"the request body is over the limit of {limit} bytes \(64 MiB\) \(its Content-Length says "
                    rf"{10 * limit}\): send fewer or smaller images a request\.$", answer["error"]), answer
    # Chunked (no length): counted as it arrives.
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        raw.sendall(f"POST {V1} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    f"Transfer-Encoding: chunked\r\n\r\n{limit + 1:x}\r\n".encode() + b" " * (limit + 1) + b"\r\n0\r\n\r\n")
        head = raw.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413 "), head[:200]
    assert request(port, "POST", V1, v1_body([photos["0.jpg"].read_bytes()]))[0] == 200


def test_load_on_loopback_loses_no_request(server, photos, expected):
    """8 client threads, 200 requests (V1 and V2 in turn, 1-3 images each): every answer 200, complete and right."""
    port, _ = server
    names = list(photos)
    threads, per_thread = 8, 25
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for r in range(per_thread):
                chosen = [names[(t + r + i) % len(names)] for i in range(1 + (t + r) % 3)]
                images = [photos[n].read_bytes() for n in chosen]
                v2 = r % 2 == 1
                started = time.perf_counter()
                status, answer = request(port, "POST", V2 if v2 else V1, (v2_body if v2 else v1_body)(images),
                                         connection=connection)
                elapsed = time.perf_counter() - started
                if status != 200:
                    got = [f"{status} {answer}"]
                elif v2:
                    got = np.array(v2_outputs(answer)["labels"]["data"]).reshape(len(images), -1)[:, 0].tolist()
                else:
                    got = [p["labels"][0] for p in answer["predictions"]]
                with lock:
                    latencies.append(elapsed)
                    if got != [expected[n] for n in chosen]:
                        failures.append(f"thread {t} request {r}: {got}")
        finally:
            connection.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    assert not failures, failures[:5]
    assert len(latencies) == threads * per_thread
    ms = sorted(1000 * s for s in latencies)
    print(f"\n{len(ms)} requests from {threads} threads in {wall:.1f} s ({len(ms) / wall:.0f}/s): "
          f"p50 {statistics.median(ms):.1f} ms, p99 {ms[int(0.99 * (len(ms) - 1))]:.1f} ms")


def test_a_version_that_cannot_be_loaded_exits_2_before_listening(trained_model_dir, tmp_path):
    """Not a kftune export (a model folder): one line, exit code 2, and nothing listens."""
    port = _free_port()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", str(trained_model_dir), "--host",
                           "127.0.0.1", "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("kftune")]
    assert lines == [f"kftune: error: `{trained_model_dir}` is neither an exported version nor a model base holding "
                     "one: give <base>/<N> or the base export_destination named."], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- kftune predict


def test_kftune_predict_prints_json_or_plain_lines_and_names_a_bad_file(base, photos, expected, tmp_path, capsys):
    files = [str(photos[n]) for n in ("0.jpg", "6.png", "7-gray.jpg", "8-40px.jpg")]
    assert cli.main(["predict", str(base / "1"), *files, "--json"]) == 0
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert [a["file"] for a in answers] == files
    assert [a["labels"][0] for a in answers] == [expected[Path(f).name] for f in files]
    assert all(len(a["labels"]) == len(a["scores"]) == 1 for a in answers)
    assert re.match(r"kftune: version 1 of .*\(saved_model.pb, tensorflow\)", captured.err), captured.err

    assert cli.main(["predict", str(base / "1"), *files[:2], "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files[:2]
    for line, f in zip(lines, files[:2], strict=True):
        assert re.fullmatch(r"(\S+ [01]\.\d{4}, ){2}\S+ [01]\.\d{4}", line.split("\t")[1]), line
        assert line.split("\t")[1].startswith(f"{expected[Path(f).name]} ")

    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    assert cli.main(["predict", str(base / "1"), files[0], str(bad), files[1], "--json"]) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["file"] for line in captured.out.splitlines()] == [files[0], files[1]]
    errors = [line for line in captured.err.splitlines() if line.startswith("kftune: error")]
    assert len(errors) == 1 and errors[0].startswith(f"kftune: error: `{bad}` is not an image kftune can decode")

    # A folder stands for its images, its subfolders' too, as ingest reads a class folder: a test set kept in
    # class folders is classified in one command; macOS metadata and other files are not sent.
    folder = tmp_path / "test-set"
    for f in files[:3]:
        (folder / ("cat" if "gray" in f else "dog")).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / ("cat" if "gray" in f else "dog") / Path(f).name)
    (folder / "dog" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    (folder / "README.txt").write_text("photos from the field")
    assert cli.main(["predict", str(base / "1"), str(folder), files[3], "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(a["file"]).name for a in answers] == ["7-gray.jpg", "0.jpg", "6.png", "8-40px.jpg"]
    assert [a["labels"][0] for a in answers] == [expected[Path(a["file"]).name] for a in answers]
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(base / "1"), str(tmp_path / "empty")]) == 2
    assert f"kftune: error: folder `{tmp_path / 'empty'}` holds no image files" in capsys.readouterr().err

    # A base: its newest complete version, 2 (int8 TFLite through LiteRT).
    assert cli.main(["predict", str(base), files[0]]) == 0
    captured = capsys.readouterr()
    assert re.match(r"kftune: version 2 of .*candidate quantized \(model_int8.tflite, kftune\)", captured.err)
    assert captured.out.startswith(f"{files[0]}\t")
