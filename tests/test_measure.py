"""One way to measure a model: the Keras and TFLite runners answer the same calls, and
measure.score streams a split in batches and gives what the whole split in memory gives."""

import warnings

import numpy as np
import pytest

from kftune import dataset, measure, models, quantize
from kftune import evaluate as ev


class Recording:
    """Wraps a runner and records the size of every batch it is given."""

    def __init__(self, runner):
        self.runner, self.batches = runner, []

    def predict(self, images):
        self.batches.append(len(images))
        return self.runner.predict(images)


@pytest.fixture(scope="module")
def float_tflite(trained_model_dir, tmp_path_factory):
    import tensorflow as tf

    model, _ = models.load(trained_model_dir)
    path = tmp_path_factory.mktemp("tflite") / "model.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


@pytest.fixture(scope="module")
def int8_tflite(trained_model_dir, digits_dir, tmp_path_factory):
    """The trained model fully quantized by kftune (uint8 in and out), calibrated on the validation split."""
    model, _ = models.load(trained_model_dir)
    path = tmp_path_factory.mktemp("tflite") / quantize.file_name("int8")
    path.write_bytes(quantize.convert(model, "int8", dataset.load_split(digits_dir, "validation")))
    return path


@pytest.fixture()
def small_batches(monkeypatch, digits_dir):
    """A scoring budget of 40 images at the fixture's 16x16x3, so a split takes several batches."""
    monkeypatch.setattr(dataset, "EVAL_BATCH_BYTES", 40 * 16 * 16 * 3)
    return 40


def test_score_streams_batches_and_equals_the_split_in_memory(trained_model_dir, digits_dir, small_batches):
    model, _ = models.load(trained_model_dir)
    runner = Recording(measure.KerasRunner(model))
    result = measure.score(runner, dataset.load_split(digits_dir, "test"), latency_batch_sizes=())

    images, labels = dataset.load_arrays(digits_dir, "test")
    assert len(runner.batches) == -(-len(labels) // small_batches) > 3
    assert max(runner.batches) == small_batches, "one batch of images at a time, never the split"
    expected = model.predict(images.astype("float32"), batch_size=len(images), verbose=0)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_allclose(result.outputs, expected, rtol=1e-4, atol=1e-6)
    assert result.accuracy == pytest.approx(float(np.mean(expected.argmax(-1) == labels)))
    models.compile_model(model, 10, learning_rate=1e-3)
    keras_loss = model.evaluate(images.astype("float32"), labels, batch_size=len(images), verbose=0)[0]
    assert result.loss == pytest.approx(keras_loss, rel=1e-4)


def test_the_keras_runner_traces_once_for_every_batch_size(trained_model_dir, digits_dir):
    # Scoring's batches, its shorter last batch and the latency batches share one graph: a trace each
    # would cost seconds per measurement and fill the step's log with TensorFlow's retracing warning.
    model, _ = models.load(trained_model_dir)
    runner = measure.KerasRunner(model)
    images, _ = dataset.load_arrays(digits_dir, "test")
    for batch in (len(images), 7, 1, 32):
        np.testing.assert_allclose(runner.predict(images[:batch]), model(images[:batch].astype("float32")).numpy(),
                                   rtol=1e-5, atol=1e-6)
    measure.latency_ms(runner, images, batch_size=3)
    assert runner._function.experimental_get_tracing_count() == 1


def test_evaluate_streamed_equals_evaluate_in_memory(trained_model_dir, digits_dir, small_batches):
    result = ev.evaluate("baseline", trained_model_dir, digits_dir)
    info = dataset.DatasetInfo.load(digits_dir)
    images, labels = dataset.load_arrays(digits_dir, "test")
    outputs = models.load(trained_model_dir)[0].predict(images.astype("float32"), verbose=0)
    in_memory = ev.scores(labels, outputs, info.class_names)
    assert result.examples == len(labels)
    assert result.confusion_matrix == in_memory.pop("confusion_matrix")
    for key, value in in_memory.items():
        assert getattr(result, key) == pytest.approx(value), key


def test_keras_and_tflite_runners_answer_the_same_calls(trained_model_dir, digits_dir, float_tflite):
    model, _ = models.load(trained_model_dir)
    keras = measure.KerasRunner(model, trained_model_dir / models.MODEL_FILE)
    tflite = measure.TFLiteRunner(float_tflite)
    images, _ = dataset.load_arrays(digits_dir, "validation")
    np.testing.assert_allclose(tflite.predict(images[:50]), keras.predict(images[:50]), atol=1e-4)
    assert keras.parameters() == model.count_params()
    assert tflite.parameters() >= model.count_params() * 0.9  # the weights, maybe folded or split
    for runner, path in ((keras, trained_model_dir / models.MODEL_FILE), (tflite, float_tflite)):
        assert runner.size().raw_bytes == path.stat().st_size
        for batch_size in measure.LATENCY_BATCH_SIZES:
            assert measure.latency_ms(runner, images[:3], batch_size=batch_size, repeats=3) > 0
    # The last, shorter batch of a split: both give one row per image.
    assert tflite.predict(images[:7]).shape == keras.predict(images[:7]).shape == (7, 10)


def test_tflite_models_run_on_litert_and_an_int8_model_agrees_with_keras(trained_model_dir, digits_dir, int8_tflite):
    # LiteRT (ai-edge-litert) runs the .tflite files: tf.lite.Interpreter is deprecated, warns on every
    # construction and is a different class, so going back to it fails both checks below.
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = measure.TFLiteRunner(int8_tflite)
    assert type(runner.interpreter) is Interpreter
    assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
    assert runner.input["dtype"] == runner.output["dtype"] == np.uint8
    assert runner.input["quantization"][0] > 0 and runner.output["quantization"][0] > 0

    model, _ = models.load(trained_model_dir)
    images, labels = dataset.load_arrays(digits_dir, "test")
    images = images[:40]
    outputs = runner.predict(images)
    expected = model.predict(images.astype("float32"), verbose=0)
    # Dequantized: probabilities again, in steps of the output scale.
    assert outputs.dtype == np.float32 and outputs.shape == expected.shape
    np.testing.assert_allclose(outputs.sum(-1), 1.0, atol=0.05)
    np.testing.assert_allclose(outputs, expected, atol=0.1)
    # Quantization may swap the top two of a near tie; on every other image the top-1 is the Keras one.
    agree = outputs.argmax(-1) == expected.argmax(-1)
    ties = np.sort(expected, -1)[:, -1] - np.sort(expected, -1)[:, -2] < 0.1
    assert np.all(agree | ties), f"top-1 differs on {np.flatnonzero(~agree).tolist()}"
    assert np.mean(agree) >= 0.95
    keras_accuracy = np.mean(expected.argmax(-1) == labels[:40])
    assert keras_accuracy > 0.6 and np.mean(outputs.argmax(-1) == labels[:40]) >= keras_accuracy - 0.05


def test_int8_calibration_needs_images(trained_model_dir, digits_dir):
    from kftune.errors import InputError

    model, _ = models.load(trained_model_dir)
    empty = dataset.load_split(digits_dir, "test").take(0)
    with pytest.raises(InputError, match="needs representative images"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize.convert(model, "int8", empty)
