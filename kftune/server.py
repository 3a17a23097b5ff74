"""``kftune serve``: an exported version behind KServe's model server, over V1 and V2 (Open Inference Protocol) REST.

The server is KServe's own (``kserve.ModelServer``: FastAPI on uvicorn), so
the health, readiness, model-list and metadata routes are KServe's, and the
same command is the container of kftune's KServe custom predictor. The model
is one :class:`VersionModel`, which hands encoded images to
:class:`kftune.serving.Servable` (the chosen candidate: the SavedModel, or the
int8 TFLite file through LiteRT) and answers with class names.

V1 (TF Serving's JSON, what KServe's V1 predictor takes)::

    POST /v1/models/NAME:predict
    {"instances": [{"image_bytes": {"b64": "<base64 JPEG>"}, "key": "optional"}, ...]}
    -> {"predictions": [{"labels": ["7", "1", ...], "scores": [0.98, 0.01, ...], "key": "..."}, ...]}

V2 (Open Inference Protocol). JSON carries BYTES as strings, so each image is a base64 string; in the
binary tensor extension too, since KServe 0.21 hands BYTES on to the model only as UTF-8 text::

    POST /v2/models/NAME/infer
    {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [N], "data": ["<base64>", ...]},
                {"name": "key", "datatype": "BYTES", "shape": [N], "data": ["a", ...]}]}       # key optional
    -> outputs ``labels`` (BYTES [N, k]), ``scores`` (FP32 [N, k]), best first, and ``key`` (BYTES [N]) if sent

Limits: at most ``serving.MAX_BATCH`` images a request, ``serving.MAX_IMAGE_BYTES``
an image and ``serving.MAX_PIXELS`` pixels an image (kftune.serving), and
``MAX_BODY_BYTES`` a request body (413, refused before the body is read when
its Content-Length says so). A bad request gets a 4xx with one line in
``{"error": ...}``; the server goes on answering.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import math
import re
import socket
import tempfile
import threading
import uuid
import warnings
from collections.abc import Sequence

import numpy as np

from kftune import export, serving
from kftune.errors import InputError
from kftune.kserve_compat import V1_EXAMPLE as _V1_EXAMPLE
from kftune.kserve_compat import V2_EXAMPLE as _V2_EXAMPLE
from kftune.kserve_compat import InvalidInput, ModelServer, import_kserve

kserve = import_kserve()
from kserve import model_server  # noqa: E402 - kserve_compat imported it with sys.argv hidden
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402

# A request body's limit: a batch of MAX_BATCH photos of about 0.7 MiB each once base64'd, or two
# photos at MAX_IMAGE_BYTES (base64 makes 16 MiB 21.3). The body is read whole before it is parsed,
# so without a limit one client could make the server hold gigabytes.
MAX_BODY_BYTES = 64 * 2**20
IMAGE_INPUT = "image_bytes"
KEY_INPUT = "key"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class VersionModel(kserve.Model):
    """One exported version as a KServe model: encoded images in (V1 instances or V2 tensors), class names out."""

    def __init__(self, name: str, uri: str, workdir: str):
        super().__init__(name)
        self.uri, self.workdir = uri, workdir
        self.servable: serving.Servable | None = None
        self._lock: contextlib.AbstractContextManager = contextlib.nullcontext()

    def load(self) -> bool:
        """Resolves, verifies and loads the version (kftune.serving.open_version).

        Raises:
            InputError: No such version, or not a kftune export (kftune's one line; ``kftune serve`` exits 2).
        """
        self.servable = serving.open_version(self.uri, self.workdir)
        if self.servable.runtime == export.RUNTIME_TFLITE:
            # LiteRT's interpreter holds one set of input and output tensors: two requests at once
            # would overwrite each other's. A SavedModel signature may be called from many threads.
            self._lock = threading.Lock()
        # One request's work before the server says ready: TensorFlow's first eager image decode took
        # 2.6 s here (the first real request took 2.4 s instead of 5 ms), and LiteRT builds its delegate.
        import tensorflow as tf

        spec = self.servable.spec
        blank = tf.io.encode_png(tf.zeros((spec.image_size + 1, spec.image_size + 1, spec.channels), tf.uint8))
        self.servable.predict([blank.numpy()])
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": KEY_INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        k = self.servable.spec.top_k if self.servable else serving.TOP_K
        return [{"name": "labels", "datatype": "BYTES", "shape": [-1, k]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, k]}]

    def _predict(self, images: list[bytes], keys: list[str]) -> list[serving.Prediction]:
        with self._lock:
            return self.servable.predict(images, keys)

    async def _answers(self, images: list[bytes], keys: list[str]) -> list[serving.Prediction]:
        # Decoding and the model run in KServe's thread pool (ModelServer sets the loop's default
        # executor): on the event loop they would hold up every other request, health checks included.
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._predict, images, keys)
        except InputError as e:
            raise InvalidInput(str(e)) from None

    async def predict(self, payload, headers: dict | None = None, response_headers: dict | None = None):
        """Answers a V1 request (a dict) or a V2 one (an InferRequest); a bad one raises InvalidInput (400)."""
        if isinstance(payload, InferRequest):
            images, keys = v2_images(payload)
            predictions = await self._answers(images, keys)
            return v2_response(self.name, payload.id, predictions, with_keys=bool(keys))
        images, keys = v1_images(payload)
        predictions = await self._answers(images, keys)
        return {"predictions": [p.to_json() for p in predictions]}


# ---------------------------------------------------------------- the two request formats


def _base64(text: str, what: str) -> bytes:
    try:
        # Either alphabet: TF Serving's clients send the standard one, browsers often the URL-safe one.
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text.encode("ascii"))
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise InvalidInput(f"{what} is not valid base64 ({e}): send the file's bytes base64-encoded.") from None


def v1_images(payload) -> tuple[list[bytes], list[str]]:
    """The encoded images and keys of a V1 request body.

    Raises:
        InvalidInput: Not ``{"instances": [{"image_bytes": {"b64": ...}, "key": ...}, ...]}``.
    """
    if isinstance(payload, bytes | str):
        # KServe passes a body it did not parse as JSON (its Content-Type is not a JSON one, as
        # curl -d sends) through as it came; it is read as JSON here rather than refused.
        import json

        try:
            payload = json.loads(payload)
        except ValueError as e:
            raise InvalidInput(f"the request body is not JSON ({e}): send {_V1_EXAMPLE}") from None
    if not isinstance(payload, dict) or "instances" not in payload:
        got = f"keys {sorted(payload)[:5]}" if isinstance(payload, dict) else type(payload).__name__
        raise InvalidInput(f'the request has no "instances" (it has {got}): send {_V1_EXAMPLE}')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InvalidInput(f'"instances" must be a list, not {type(instances).__name__}: send {_V1_EXAMPLE}')
    if len(instances) > serving.MAX_BATCH:  # before any base64 is decoded
        raise InvalidInput(f"the request holds {len(instances)} images, over the limit of {serving.MAX_BATCH} a "
                           "request: split it.")
    images, keys = [], []
    for i, instance in enumerate(instances):
        encoded = instance.get(IMAGE_INPUT) if isinstance(instance, dict) else None
        if not isinstance(encoded, dict) or not isinstance(encoded.get("b64"), str):
            raise InvalidInput(f'instance {i} has no "image_bytes": {{"b64": "..."}} (got {_shape_of(instance)}): '
                               f"send {_V1_EXAMPLE}")
        key = instance.get(KEY_INPUT, "")
        if not isinstance(key, str):
            raise InvalidInput(f'instance {i}\'s "key" must be a string, not {type(key).__name__}.')
        images.append(_base64(encoded["b64"], f"instance {i}'s image_bytes.b64"))
        keys.append(key)
    return images, keys if any(keys) else []


def _shape_of(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}": {type(v).__name__}' for k, v in list(value.items())[:4]) + "}"
    return type(value).__name__


def _flat(data) -> list:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).tolist()
    out = []
    for item in data if isinstance(data, list | tuple) else [data]:
        out.extend(_flat(item) if isinstance(item, list | tuple) else [item])
    return out


def _v2_strings(request: InferRequest, name: str, required: bool) -> list[str | bytes] | None:
    tensor = request.get_input_by_name(name)
    if tensor is None:
        if required:
            names = [t.name for t in request.inputs]
            raise InvalidInput(f'the request has no input named "{name}" (it has {names}): send {_V2_EXAMPLE}')
        return None
    if tensor.datatype != "BYTES":
        raise InvalidInput(f'input "{name}" must have datatype BYTES, not {tensor.datatype}: send {_V2_EXAMPLE}')
    values = _flat(tensor.data if tensor.data is not None else [])
    shape = list(tensor.shape or [])
    if not shape or math.prod(shape) != len(values):
        raise InvalidInput(f'input "{name}" has shape {shape} but {len(values)} values: give shape [N] for N values.')
    if not all(isinstance(v, str | bytes) for v in values):
        raise InvalidInput(f'input "{name}" holds values that are not strings: send base64 strings.')
    return values


def v2_images(request: InferRequest) -> tuple[list[bytes], list[str]]:
    """The encoded images and keys of a V2 request: ``image_bytes`` base64 strings (raw bytes over gRPC), ``key``.

    Raises:
        InvalidInput: No BYTES input ``image_bytes``, a shape that does not match the values, bad base64,
            or keys that do not pair with the images.
    """
    values = _v2_strings(request, IMAGE_INPUT, required=True)
    if len(values) > serving.MAX_BATCH:  # before any base64 is decoded
        raise InvalidInput(f"the request holds {len(values)} images, over the limit of {serving.MAX_BATCH} a "
                           "request: split it.")
    images = [v if isinstance(v, bytes) else _base64(v, f"image {i} of image_bytes") for i, v in enumerate(values)]
    keys = _v2_strings(request, KEY_INPUT, required=False) or []
    keys = [k.decode("utf-8", "replace") if isinstance(k, bytes) else k for k in keys]
    return images, keys


def v2_response(model_name: str, request_id: str | None, predictions: Sequence[serving.Prediction],
                with_keys: bool) -> InferResponse:
    labels = np.array([p.labels for p in predictions], dtype=object)
    scores = np.array([p.scores for p in predictions], dtype=np.float32)
    outputs = [InferOutput("labels", list(labels.shape), "BYTES", labels),
               InferOutput("scores", list(scores.shape), "FP32", scores)]
    if with_keys:
        outputs.append(InferOutput(KEY_INPUT, [len(predictions)], "BYTES",
                                   np.array([p.key for p in predictions], dtype=object)))
    return InferResponse(response_id=request_id or str(uuid.uuid4()), model_name=model_name, infer_outputs=outputs)


# ---------------------------------------------------------------- the HTTP app around KServe's routes


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413, the app never sees it.

    A Content-Length over the limit is refused before the body is read; a body
    without one (chunked) is counted as it arrives and refused once past it.
    """

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send, int(declared))
        # Read here, whole, as KServe's handlers would: counted, so a body with no length is capped too.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send, None)
            if not message.get("more_body"):
                break
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send, declared: int | None) -> None:
        import json

        said = f" (its Content-Length says {declared})" if declared is not None else ""
        body = json.dumps({"error": f"the request body is over the limit of {self.limit} bytes "
                                    f"({self.limit / 2**20:g} MiB){said}: send fewer or smaller images a request."})
        # The rest of the body is not read: the connection cannot carry another request after it.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})


async def _request_validation_error(request, exc):
    """FastAPI's answer to a V2 body that is not an InferenceRequest is a 422 with a list of pydantic errors;
    this is one line in KServe's ``{"error": ...}`` shape, 400 as for every other bad request."""
    from fastapi.responses import JSONResponse

    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        problem = "is not JSON"
    else:
        # loc is ("body", "InferenceRequest", "inputs", 0, "datatype"): the field's path in the request.
        where = ".".join(str(part) for part in first.get("loc", ())[2:]) or "body"
        problem = f"is not an Open Inference Protocol request ({where}: {first.get('msg', 'invalid')})"
    return JSONResponse(status_code=400, content={"error": f"the request body {problem}: send {_V2_EXAMPLE}"})


def _prepare_app(app) -> None:
    """Adds the body limit and the one-line validation error to the FastAPI app KServe serves.

    KServe's REST server serves the module-level ``kserve.model_server.app`` and adds its own
    routes, handlers and middleware to it when it starts; these go on before that.
    """
    from fastapi.exceptions import RequestValidationError

    if not any(m.cls is BodyLimit for m in app.user_middleware):
        app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, _request_validation_error)


def _check_listen(host: str, port: int) -> None:
    """Refuses a port that cannot be listened on, before the model is loaded (uvicorn binds as this does)."""
    if not 1 <= port <= 65535:
        raise InputError(f"--port must be 1-65535. Received: {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port, or a --host "
                         "this machine has.") from None


def serve(uri: str, *, port: int = 8080, name: str = "kftune", host: str = "0.0.0.0") -> int:
    """Serves the version at ``uri`` until the process is stopped (SIGTERM or SIGINT); returns the exit code.

    Raises:
        InputError: A bad name, port or host, or ``uri`` is no kftune version (before anything listens).
        StorageError: A gs:// version could not be read.
    """
    if not _NAME.match(name):
        raise InputError(f"--name must be letters, digits, '.', '_' or '-' (it is part of the URLs), at most 63. "
                         f"Received: {name!r}")
    _check_listen(host, port)
    with tempfile.TemporaryDirectory(prefix="kftune-serve-") as workdir:
        model = VersionModel(name, uri, workdir)
        model.load()
        shown = f"[{host}]" if ":" in host else host
        print(f"kftune: serving {serving.describe(model.servable)} as `{name}` on http://{shown}:{port} "
              f"(V1 /v1/models/{name}:predict, V2 /v2/models/{name}/infer)", flush=True)
        _prepare_app(model_server.app)
        # FastAPI 0.165 warns on every request that KServe's routes use ORJSONResponse: KServe's to change,
        # and two lines of it a request would bury the server's own log.
        warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
        # gRPC off: kftune's clients speak REST, and a second port is one more thing to expose and secure.
        # Per-request latency lines off: uvicorn's access log already says every request.
        server = ModelServer(host, http_port=port, enable_grpc=False, workers=1, enable_latency_logging=False)
        server.start([model])
    return 0
