"""Serving an exported version: its SavedModel signatures, and one way to run it on photos.

A version (``<base>/<N>/``, kftune.export) is served by TensorFlow Serving or
KServe's ``tensorflow`` runtime straight from its SavedModel, or by ``kftune
serve`` / ``kftune predict`` through :class:`Servable`. Both take encoded
images and give class names, and both decode and resize with the function
ingest used on the training images (``dataset.to_size``), so a photo is seen by
the served model exactly as training saw its images.

The SavedModel's signatures (``saved_model_cli show --dir VERSION --all``):

- ``serving_default``: ``image_bytes`` (string [N]: JPEG, PNG, GIF or BMP, any
  size, grayscale or colour; base64 ``{"b64": ...}`` in TF Serving's REST JSON)
  -> ``scores`` (float [N, k]: probabilities, best first), ``labels`` (string
  [N, k]: class names in the same order), ``probabilities`` (float [N, classes],
  in class order). k = min(5, classes).
- ``serving_keyed``: the same plus a ``key`` input (string [N]) returned as
  ``key``, for batch clients that match answers to requests. It is a second
  signature, not an optional input, because TF Serving requires every input of
  a signature in every instance.
- ``serving_pixels``: ``images`` (float [N, H, W, C], 0-255, any H and W) for
  clients that decode themselves; same outputs as ``serving_default``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune.errors import InputError

TOP_K = 5
# Limits of one request to `kftune serve` (and of `kftune predict`'s images): a batch of
# MAX_BATCH photos of MAX_IMAGE_BYTES each is about what a CPU predictor answers in seconds.
MAX_BATCH = 64
MAX_IMAGE_BYTES = 16 * 2**20
# A small PNG can declare a huge canvas (a decompression bomb): refused before it is decoded.
MAX_PIXELS = 50_000_000
SIGNATURES = ("serving_default", "serving_keyed", "serving_pixels")


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """What a served model needs besides its weights: how images are shaped, and what the classes are called."""

    class_names: list[str]
    image_size: int
    channels: int

    @property
    def top_k(self) -> int:
        return min(TOP_K, len(self.class_names))


# ---------------------------------------------------------------- the SavedModel


def _outputs(tf, probabilities, class_names, top_k: int) -> dict:
    """scores/labels (top k, best first) and the full probabilities, from the model's outputs (both head shapes)."""
    if probabilities.shape[-1] == 1:  # one sigmoid unit: P(class 1)
        probabilities = tf.concat([1.0 - probabilities, probabilities], axis=-1)
    scores, indices = tf.math.top_k(probabilities, k=top_k)
    return {"scores": scores, "labels": tf.gather(class_names, indices), "probabilities": probabilities}


def save_servable(model, path: str | Path, spec: ServingSpec) -> None:
    """Writes ``model`` as a SavedModel at ``path`` with the byte, keyed and pixel signatures (module docstring)."""
    import tensorflow as tf

    from kftune import dataset

    size, channels, top_k = spec.image_size, spec.channels, spec.top_k

    class Servable(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.class_names = tf.constant(spec.class_names)

        def _classify(self, images):
            return _outputs(tf, self.model(tf.cast(images, tf.float32), training=False), self.class_names, top_k)

        def _decode(self, image_bytes):
            def one(data):
                image = tf.io.decode_image(data, channels=channels, expand_animations=False)
                return dataset.to_size(image, size)

            return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([size, size, channels], tf.uint8))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serving_default(self, image_bytes):
            return self._classify(self._decode(image_bytes))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes"),
                                      tf.TensorSpec([None], tf.string, name="key")])
        def serving_keyed(self, image_bytes, key):
            return {**self._classify(self._decode(image_bytes)), "key": tf.identity(key)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="images")])
        def serving_pixels(self, images):
            resized = tf.map_fn(lambda image: dataset.to_size(tf.clip_by_value(tf.round(image), 0, 255), size),
                                images, fn_output_signature=tf.TensorSpec([size, size, channels], tf.uint8))
            return self._classify(resized)

    module = Servable()
    signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
    tf.saved_model.save(module, str(path), signatures=signatures)


# ---------------------------------------------------------------- requests


def _declared_pixels(data: bytes) -> int | None:
    """Width x height a PNG or JPEG header declares, read without decoding; None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width * height
    if data[:2] == b"\xff\xd8":
        import tensorflow as tf

        try:
            height, width, _ = (int(v) for v in tf.io.extract_jpeg_shape(data).numpy())
        except tf.errors.InvalidArgumentError:
            return None  # decode says what is wrong with it
        return width * height
    return None


def decode(data: bytes, spec: ServingSpec, what: str = "image") -> np.ndarray:
    """One encoded image as uint8 [size, size, channels], decoded and resized as ingest did.

    Raises:
        InputError: ``data`` is empty, too large, or not an image TensorFlow decodes; the message names ``what``.
    """
    import tensorflow as tf

    from kftune import dataset

    if not isinstance(data, bytes | bytearray) or not data:
        raise InputError(f"{what} is empty: send the bytes of a JPEG, PNG, GIF or BMP file.")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"{what} is {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}: send a smaller file.")
    pixels = _declared_pixels(bytes(data))
    if pixels is not None and pixels > MAX_PIXELS:
        raise InputError(f"{what} declares {pixels} pixels, over the limit of {MAX_PIXELS}: send a smaller image.")
    try:
        image = tf.io.decode_image(bytes(data), channels=spec.channels, expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as e:
        # TensorFlow prefixes the op's name ({{function_node ...}}); the reason is what follows.
        reason = re.sub(r"\{\{.*?\}\}", "", str(e)).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise InputError(f"{what} is not an image kftune can decode ({reason}): send a JPEG, PNG, GIF or BMP "
                         "file.") from None
    return dataset.to_size(image, spec.image_size).numpy()


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's answer: class names and their probabilities, best first, and the caller's key."""

    labels: list[str]
    scores: list[float]
    key: str = ""

    def to_json(self) -> dict:
        return {"labels": self.labels, "scores": self.scores, **({"key": self.key} if self.key else {})}


# ---------------------------------------------------------------- running a version


class Servable:
    """An exported version loaded for answering: the chosen candidate, in the runtime that runs it.

    A SavedModel version is run through its own ``serving_pixels`` signature
    (what TF Serving runs); a version whose chosen candidate is a TFLite file
    through LiteRT (kftune.measure.TFLiteRunner). Images are decoded here, one
    at a time, so that a bad one is named (``image 3 is not an image ...``)
    instead of failing the batch inside the graph.
    """

    def __init__(self, folder: str | Path):
        from kftune import export

        self.folder = Path(folder)
        metadata = export.read_metadata(self.folder)
        serving = metadata.get("serving") or {}
        if not serving:
            raise InputError(f"`{self.folder}` was exported before kftune's serving signatures (its metadata.json "
                             "has no `serving` section): export the model again with this kftune.")
        self.metadata = metadata
        self.version = str(metadata.get("version", ""))
        self.candidate = str(serving["candidate"])
        self.runtime = str(serving["runtime"])
        self.model_file = str(serving["model_file"])
        self.spec = ServingSpec(list(serving["class_names"]), int(serving["image_size"]), int(serving["channels"]))
        if self.runtime == export.RUNTIME_TFLITE:
            from kftune import measure

            self._runner = measure.TFLiteRunner(self.folder / self.model_file)
            self._probabilities = self._runner.predict
        else:
            import tensorflow as tf

            signature = tf.saved_model.load(str(self.folder)).signatures["serving_pixels"]
            self._probabilities = lambda images: signature(images=tf.constant(images, tf.float32))["probabilities"].numpy()

    @property
    def class_names(self) -> list[str]:
        return self.spec.class_names

    def classify(self, images: np.ndarray, keys: Sequence[str] = (), top_k: int = TOP_K) -> list[Prediction]:
        """Answers for a batch of decoded uint8 images at the model's size."""
        from kftune import models

        probabilities = models.class_probabilities(self._probabilities(np.asarray(images, np.float32)))
        k = max(1, min(top_k, len(self.class_names)))
        order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
        keys = list(keys) or [""] * len(probabilities)
        return [Prediction([self.class_names[i] for i in row], [round(float(p[i]), 6) for i in row], key)
                for row, p, key in zip(order, probabilities, keys, strict=True)]

    def predict(self, images: Sequence[bytes], keys: Sequence[str] = (), top_k: int = TOP_K) -> list[Prediction]:
        """Answers for encoded images (JPEG, PNG, ...), in order.

        Raises:
            InputError: An empty batch, one over MAX_BATCH, keys that do not pair with the images,
                or an image that is not one (named by its position).
        """
        if not images:
            raise InputError("the request holds no images: send at least one.")
        if len(images) > MAX_BATCH:
            raise InputError(f"the request holds {len(images)} images, over the limit of {MAX_BATCH} a request: "
                             "split it.")
        if keys and len(keys) != len(images):
            raise InputError(f"the request has {len(keys)} keys for {len(images)} images: give one key per image "
                             "or none.")
        decoded = np.stack([decode(data, self.spec, f"image {i}") for i, data in enumerate(images)])
        return self.classify(decoded, keys, top_k)


def open_version(uri: str, workdir: str | Path) -> Servable:
    """The version at ``uri`` (a version, or a base: its newest complete version), verified and loaded.

    ``gs://`` versions are downloaded under ``workdir``; every file is checked
    against the version's manifest before it is used.
    """
    from kftune import export

    return Servable(export.read_version(export.resolve(uri), workdir))


def describe(servable: Servable) -> str:
    """One line naming what is served: version, candidate, runtime and classes."""
    return (f"version {servable.version} of `{servable.folder}`: candidate {servable.candidate} "
            f"({servable.model_file}, {servable.runtime}), {len(servable.class_names)} classes "
            f"({', '.join(servable.class_names[:6])}{', ...' if len(servable.class_names) > 6 else ''})")


def to_json_lines(files: Sequence[str], predictions: Sequence[Prediction]) -> list[str]:
    return [json.dumps({"file": f, **p.to_json()}) for f, p in zip(files, predictions, strict=True)]
