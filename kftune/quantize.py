"""Post-training quantization to TFLite, and measuring the ``.tflite`` model.

Two modes, both tf.lite's own:

* ``dynamic``: the larger kernels stored as int8 (the converter leaves kernels of
  fewer than 1024 values in float32), activations stay float; no data needed.
* ``int8``: full integer quantization (TFLITE_BUILTINS_INT8 ops, uint8 input
  and output), calibrated on a representative sample of the validation split,
  for integer-only accelerators and microcontrollers.

Quantizing a pruned model keeps its zeros (weights are quantized symmetrically,
so 0.0 maps to 0), which is why the two savings multiply once the file is
compressed. The ``.tflite`` files are measured the way they are served: with
the TFLite interpreter, on the validation split.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import measure, models
from kftune.errors import InputError

MODES = ("dynamic", "int8")
# Enough images to calibrate activation ranges; more only slows conversion.
REPRESENTATIVE_IMAGES = 200


def file_name(mode: str) -> str:
    return f"model_{mode}.tflite"


def check_modes(modes: list[str]) -> None:
    for mode in modes:
        if mode not in MODES:
            raise InputError(f"`prune_quantize` takes a comma-separated subset of {MODES}, or nothing. Received: {mode!r}")


def convert(model, mode: str, representative_images: np.ndarray | None = None) -> bytes:
    """The model as a quantized TFLite flatbuffer."""
    import tensorflow as tf

    check_modes([mode])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        if representative_images is None or len(representative_images) == 0:
            raise InputError("full int8 quantization needs representative images: the validation split is empty.")
        sample = representative_images[:REPRESENTATIVE_IMAGES].astype(np.float32)
        converter.representative_dataset = lambda: ([image[None]] for image in sample)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # kftune models take raw 0..255 images, so uint8 input needs no rescaling by the caller.
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    with warnings.catch_warnings():
        # Raised for uint8 inputs given no quantized_input_stats: the calibration supplies them.
        warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs were expected.*")
        return converter.convert()


def _interpreter(path: str | Path, batch: int):
    import tensorflow as tf

    with warnings.catch_warnings():
        # TF 2.21 points to LiteRT's ai_edge_litert; tf.lite's interpreter is the same
        # runtime and keeps kftune on TensorFlow's own packages.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], [batch, *entry["shape"][1:]])
    interpreter.allocate_tensors()
    return interpreter


def _quantized(values: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if not scale:
        return values.astype(detail["dtype"])
    limits = np.iinfo(detail["dtype"])
    return np.clip(np.round(values / scale + zero_point), limits.min, limits.max).astype(detail["dtype"])


def _dequantized(values: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if not scale:
        return values.astype(np.float64)
    return (values.astype(np.float64) - zero_point) * scale


def predict(path: str | Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Model outputs (float) for ``images``, run by the TFLite interpreter."""
    batch_size = max(1, min(batch_size, len(images)))
    interpreter = _interpreter(path, batch_size)
    entry, exit_ = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].astype(np.float32)
        # The interpreter's input shape is fixed once allocated: pad the last batch, then drop the padding.
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), np.float32)])
        interpreter.set_tensor(entry["index"], _quantized(padded, entry))
        interpreter.invoke()
        outputs.append(_dequantized(interpreter.get_tensor(exit_["index"]), exit_)[: len(chunk)])
    return np.concatenate(outputs)


def latency_ms(path: str | Path, images: np.ndarray, repeats: int = 20) -> float:
    """Median milliseconds for one image through the interpreter (after warm-up)."""
    interpreter = _interpreter(path, 1)
    entry = interpreter.get_input_details()[0]
    interpreter.set_tensor(entry["index"], _quantized(images[:1].astype(np.float32), entry))
    interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def evaluate(path: str | Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, loss, sizes and latency of a ``.tflite`` file on labelled images."""
    outputs = predict(path, images)
    # Cross-entropy from the probabilities, as kftune.evaluate computes it for Keras models.
    probabilities = np.clip(models.class_probabilities(outputs), 1e-7, 1.0)
    size = measure.file_size(path)
    return {
        "accuracy": float(np.mean(models.predict_classes(outputs) == labels)),
        "loss": float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels]))),
        "size_bytes": size.raw_bytes,
        "gzip_bytes": size.gzip_bytes,
        "latency_ms": latency_ms(path, images),
    }


def quantize(model, modes: list[str], output_dir: str | Path, images: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """Writes ``model_<mode>.tflite`` into ``output_dir`` for each mode and measures each on (images, labels).

    ``images`` also calibrate the int8 model, so pass the validation split, never the test split.
    """
    check_modes(modes)
    results = {}
    for mode in modes:
        path = Path(output_dir, file_name(mode))
        path.write_bytes(convert(model, mode, images))
        results[mode] = {"file": path.name, **evaluate(path, images, labels)}
    return results
