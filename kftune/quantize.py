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
LiteRT's interpreter (ai-edge-litert), on the validation split.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import measure
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


def convert(model, mode: str, representative=None) -> bytes:
    """The model as a quantized TFLite flatbuffer.

    ``representative`` (int8 only): a ``tf.data.Dataset`` of single (image, label)
    pairs, such as the validation split; its first REPRESENTATIVE_IMAGES images
    calibrate the activation ranges, read one at a time.
    """
    import tensorflow as tf

    check_modes([mode])
    # From the traced call, with only the variables to keep alive: from_keras_model (or the model
    # as the trackable) has TensorFlow walk every Keras object while it writes a temporary
    # SavedModel, which took 60-90 s of the 100 for a MobileNetV2 classifier on 2 cores; this 10.
    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
    call = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    holder = tf.Module()
    holder.variables_kept = list(model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([call], holder)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        if representative is None or next(iter(representative.take(1)), None) is None:
            raise InputError("full int8 quantization needs representative images: the validation split is empty.")
        converter.representative_dataset = lambda: (
            [tf.cast(image, tf.float32)[None]] for image, _ in representative.take(REPRESENTATIVE_IMAGES).prefetch(tf.data.AUTOTUNE))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # kftune models take raw 0..255 images, so uint8 input needs no rescaling by the caller.
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    with warnings.catch_warnings():
        # Raised for uint8 inputs given no quantized_input_stats: the calibration supplies them.
        warnings.filterwarnings("ignore", message=".*Statistics for quantized inputs were expected.*")
        return converter.convert()


def evaluate(path: str | Path, data) -> dict:
    """The figures of :func:`kftune.measure.measured` for a ``.tflite`` file on ``data``, streamed.

    ``data`` is a ``tf.data.Dataset`` of single (image, label) pairs.
    """
    return measure.measured(measure.TFLiteRunner(path), data)[1]


def quantize(model, modes: list[str], output_dir: str | Path, data) -> dict[str, dict]:
    """Writes ``model_<mode>.tflite`` into ``output_dir`` for each mode and measures each on ``data``.

    ``data`` (a ``tf.data.Dataset`` of single (image, label) pairs) also calibrates
    the int8 model, so pass the validation split, never the test split.
    """
    check_modes(modes)
    results = {}
    for mode in modes:
        path = Path(output_dir, file_name(mode))
        path.write_bytes(convert(model, mode, data))
        results[mode] = {"file": path.name, **evaluate(path, data)}
    return results
