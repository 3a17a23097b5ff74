"""Measuring models: one runner per runtime, one scoring function, sizes, sparsity.

Every step that measures a model (prune before and after, the TFLite files,
evaluate's candidates) does it the same way: a runner, :class:`KerasRunner` or
:class:`TFLiteRunner`, answers ``predict`` (one batch), ``size`` and
``parameters``; :func:`latency_ms` times its ``predict``; :func:`score` streams
a split through it in batches, so that memory holds one batch of images however
large the split; and :func:`measured` gives the figures every report shows.

A pruned model is exactly as large on disk as the dense one: pruning sets
weights to zero but keeps them. The saving appears once the file is compressed
(zeros compress well) or in a runtime that stores sparse tensors, which is why
every size kftune reports comes in two: raw and gzip-compressed.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import time
from pathlib import Path

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, models
from kftune.errors import InputError

LATENCY_BATCH_SIZES = (1, 32)


@dataclasses.dataclass
class Size:
    raw_bytes: int
    gzip_bytes: int


def file_size(path: str | os.PathLike) -> Size:
    """Raw and gzip-compressed size of a file, or of all files under a folder."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    raw = gzipped = 0
    for f in files:
        data = f.read_bytes()
        raw += len(data)
        gzipped += len(gzip.compress(data, compresslevel=9))
    return Size(raw, gzipped)


def sparsity(model) -> dict[str, float]:
    """Share of exact zeros in each layer's kernel, and ``overall`` over all kernels.

    Biases and BatchNormalization statistics are left out, as tfmot leaves them unpruned.
    """
    per_layer, zeros, total = {}, 0, 0
    for layer in leaf_layers(model):
        values = kernel_values(layer)
        if values is None:
            continue
        per_layer[layer.name] = float(np.mean(values == 0))
        zeros += int(np.sum(values == 0))
        total += values.size
    per_layer["overall"] = zeros / total if total else 0.0
    return per_layer


def kernel_values(layer) -> np.ndarray | None:
    """All of ``layer``'s kernel weights, flattened (what magnitude pruning prunes); None for a layer without."""
    kernels = [w for w in layer.weights if "kernel" in w.name and "bias" not in w.name]
    return np.concatenate([w.numpy().ravel() for w in kernels]) if kernels else None


def leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from leaf_layers(layer)
        else:
            yield layer


# ---------------------------------------------------------------- runners


class KerasRunner:
    """A tf-keras model called in inference mode, one batch at a time.

    ``path`` is the file the model was loaded from (what :meth:`size` measures);
    None for a model not saved yet, which then has no size.
    """

    def __init__(self, model, path: str | os.PathLike | None = None):
        import tensorflow as tf

        self.model, self.path = model, Path(path) if path is not None else None
        # Traced once, for any batch size: scoring's batches, its shorter last batch and the latency
        # batches (1, 32) all take the one graph instead of a trace each. The concrete function is
        # what a server calls (a SavedModel signature); calling it skips tf.function's argument
        # matching, about 0.3 ms a call, which would otherwise be most of a small model's latency.
        signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
        self._function = tf.function(lambda x: model(x, training=False), input_signature=signature)
        self._infer = self._function.get_concrete_function()

    def predict(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self._infer(tf.constant(np.asarray(images, np.float32))).numpy()

    def parameters(self) -> int:
        return int(self.model.count_params())

    def size(self) -> Size:
        if self.path is None:
            raise ValueError("this model was not loaded from a file, so it has no size on disk")
        return file_size(self.path)


class TFLiteRunner:
    """A TFLite classifier run by LiteRT's interpreter: uint8-range images in, float outputs out.

    Full-integer models (int8/uint8 inputs and outputs) are fed quantized
    images and their outputs dequantized, with the scales stored in the file,
    so that every candidate is scored on the same float outputs.
    """

    def __init__(self, path: str | os.PathLike):
        # LiteRT (ai-edge-litert), not tf.lite.Interpreter: TensorFlow deprecated its interpreter for
        # this one, which reads the same files and gives the same tensors.
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(
                f"`{self.path}` does not exist: the prune step writes model_<mode>.tflite beside "
                "model.keras for each mode in its `quantize` parameter; name one it wrote."
            )
        try:
            self.interpreter = Interpreter(model_path=str(self.path))
        except ValueError as e:
            raise InputError(f"`{self.path}` is not a loadable TFLite model ({str(e).splitlines()[0][:200]}).") from e
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputError(
                f"`{self.path}` has {len(inputs)} inputs and {len(outputs)} outputs: kftune evaluates "
                "classifiers with one image input and one output."
            )
        self.input, self.output = inputs[0], outputs[0]
        # -1: any batch size; otherwise the converter fixed it and batches are cut to fit.
        self.fixed_batch = int(self.input["shape_signature"][0]) if self.input["shape_signature"][0] > 0 else 0
        self._allocated = None

    def _run(self, images: np.ndarray) -> np.ndarray:
        if self._allocated != len(images):
            self.interpreter.resize_tensor_input(self.input["index"], [len(images), *self.input["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._allocated = len(images)
        x = images.astype(np.float32)
        dtype = self.input["dtype"]
        if dtype != np.float32:
            scale, zero_point = self.input["quantization"]
            limits = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero_point), limits.min, limits.max)
        self.interpreter.set_tensor(self.input["index"], x.astype(dtype))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        if out.dtype != np.float32:
            scale, zero_point = self.output["quantization"]
            out = (out.astype(np.float32) - zero_point) * scale
        return out

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if not self.fixed_batch:
            return self._run(images)
        chunks = []
        for start in range(0, len(images), self.fixed_batch):
            chunk = images[start : start + self.fixed_batch]
            padded = np.resize(chunk, (self.fixed_batch, *chunk.shape[1:])) if len(chunk) < self.fixed_batch else chunk
            chunks.append(self._run(padded)[: len(chunk)])
        return np.concatenate(chunks)

    def parameters(self) -> int:
        """Elements of the constant tensors (weights and biases) stored in the file."""
        # LiteRT's generated reader of the TFLite schema (what tf.lite's flatbuffer_utils wraps).
        from ai_edge_litert import schema_py_generated as schema

        model = schema.ModelT.InitFromPackedBuf(bytearray(self.path.read_bytes()), 0)
        count = 0
        for tensor in model.subgraphs[0].tensors:
            buffer = model.buffers[tensor.buffer]
            # Data inline, or (files over 2 GB) at an offset past the flatbuffer.
            if tensor.buffer and (buffer.data is not None and len(buffer.data) or buffer.offset > 1):
                count += int(np.prod(tensor.shape)) if tensor.shape is not None else 1
        return count

    def size(self) -> Size:
        return file_size(self.path)


# Timing stops after this many seconds of calls (at least LATENCY_MIN_REPEATS of them): a frozen
# VGG16 at batch 32 takes seconds per call on a CPU, a small CNN a millisecond.
LATENCY_BUDGET_S = 2.0
LATENCY_MIN_REPEATS = 3


def latency_ms(runner, images: np.ndarray, *, batch_size: int, repeats: int = 20) -> float:
    """Median milliseconds for one ``runner.predict`` over ``batch_size`` images (after warm-up).

    ``images`` are repeated or cut to ``batch_size``; they only fill the batch. At most
    ``repeats`` calls are timed, fewer (never under LATENCY_MIN_REPEATS) once they
    add up to LATENCY_BUDGET_S.
    """
    batch = np.resize(np.asarray(images, np.float32), (batch_size, *np.shape(images)[1:]))
    runner.predict(batch)  # trace or allocate, and warm up
    times = []
    while len(times) < repeats and (len(times) < LATENCY_MIN_REPEATS or sum(times) < LATENCY_BUDGET_S * 1000.0):
        start = time.perf_counter()
        runner.predict(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


# ---------------------------------------------------------------- scoring


@dataclasses.dataclass
class Scores:
    """A model's outputs on a split and what follows from them.

    ``latency_ms`` maps a batch size to the median milliseconds of one call.
    """

    labels: np.ndarray
    outputs: np.ndarray
    accuracy: float
    loss: float
    latency_ms: dict[int, float]


def score(runner, data, *, latency_batch_sizes=LATENCY_BATCH_SIZES) -> Scores:
    """Streams ``data`` (a ``tf.data.Dataset`` of single (image, label) pairs) through ``runner``.

    One batch of images is in memory at a time; the outputs (one row of class
    scores per image) and labels are kept. Loss is the cross-entropy of the
    class probabilities, the same number as Keras' loss for both head shapes.
    Latency is timed on the split's first images, at each of ``latency_batch_sizes``.
    """

    outputs, labels, sample = [], [], None
    for images, batch_labels in dataset.batches(data).as_numpy_iterator():
        if sample is None:
            sample = images[: max(latency_batch_sizes, default=1)].copy()
        outputs.append(runner.predict(images))
        labels.append(batch_labels)
    if sample is None:
        raise InputError("there are no images to measure the model on: the split is empty. Ingest the dataset again "
                         "with a larger validation_fraction or test_fraction, or add images.")
    outputs, labels = np.concatenate(outputs), np.concatenate(labels).astype(np.int64)
    probabilities = np.clip(models.class_probabilities(outputs), 1e-7, 1.0)
    return Scores(
        labels=labels,
        outputs=outputs,
        accuracy=float(np.mean(models.predict_classes(outputs) == labels)),
        loss=float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels]))),
        latency_ms={size: latency_ms(runner, sample, batch_size=size) for size in latency_batch_sizes},
    )


def measured(runner, data, *, latency_batch_sizes=LATENCY_BATCH_SIZES) -> tuple[Scores, dict[str, float]]:
    """:func:`score`, and the figures every step reports of a model, named as the Run UI shows them.

    The figures: ``accuracy`` and ``loss``; for a runner with a file (``runner.path``), also
    ``size_bytes``, ``gzip_bytes``, ``parameters`` and ``latency_ms_batch<N>`` for each of
    ``latency_batch_sizes`` (a model not saved yet is only scored).
    """
    saved = runner.path is not None
    result = score(runner, data, latency_batch_sizes=latency_batch_sizes if saved else ())
    figures = {"accuracy": result.accuracy, "loss": result.loss}
    if saved:
        size = runner.size()
        figures.update(size_bytes=size.raw_bytes, gzip_bytes=size.gzip_bytes, parameters=runner.parameters(),
                       **{f"latency_ms_batch{batch}": ms for batch, ms in result.latency_ms.items()})
    return result, figures
