"""Structured pruning: the rebuilt model computes what the original computes with the removed filters and
units silenced, is smaller, names every layer it leaves whole, and goes through prune() to a dense Keras
model and an int8 TFLite file."""

import numpy as np
import pytest
import tf_keras

from kftune import models, quantize, structured
from kftune import prune as pr
from kftune.errors import InputError

k = tf_keras


@tf_keras.saving.register_keras_serializable(package="kftune_test")
class Gain(tf_keras.layers.Layer):
    """A custom layer: structured pruning cannot know what it does with its input channels."""

    def build(self, input_shape):
        self.gain = self.add_weight(name="gain", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.gain


def _randomize_statistics(model):
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, k.layers.BatchNormalization):
            layer.set_weights([w + rng.uniform(0.1, 1.0, w.shape).astype("float32") for w in layer.get_weights()])


def _silenced(model, plan):
    """A copy of ``model`` whose removed filters and units output exactly 0: what the shrunk model must equal."""
    copy = k.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for name, kept in plan.keep.items():
        dropped = np.setdiff1d(np.arange(plan.widths[name]), kept)
        layer = copy.get_layer(name)
        kernel, *rest = layer.get_weights()
        kernel[..., dropped] = 0
        layer.set_weights([kernel, *[np.where(np.isin(np.arange(w.shape[0]), dropped), 0, w) for w in rest]])
        for other in plan.reach[name][0]:
            layer = copy.get_layer(other)
            values = layer.get_weights()
            if isinstance(layer, k.layers.BatchNormalization):  # gamma and beta 0: the channel outputs 0
                values[0][dropped] = 0
                values[1][dropped] = 0
            else:  # DepthwiseConv2D: kernel and bias of the channel
                values[0][..., dropped, :] = 0
                values[1][dropped] = 0
            layer.set_weights(values)
    return copy


def sequential():
    return k.Sequential([
        k.Input((12, 12, 3)),
        k.layers.Conv2D(8, 3, name="c1"),
        k.layers.BatchNormalization(name="bn1"),
        k.layers.ReLU(),
        k.layers.DepthwiseConv2D(3, name="dw"),
        k.layers.Conv2D(12, 1, activation="relu", name="c2"),
        k.layers.MaxPooling2D(),
        k.layers.Flatten(),
        k.layers.Dropout(0.1),
        k.layers.Dense(10, activation="relu", name="d1"),
        k.layers.Dense(3, activation="softmax", name="out"),
    ])


def functional():
    inputs = k.Input((12, 12, 3))
    x = k.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    y = k.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = k.layers.Add(name="add")([x, y])
    x = k.layers.Conv2D(16, 3, activation="relu", name="c3")(x)
    x = Gain(name="gain")(x)
    x = k.layers.Conv2D(6, 1, name="c4")(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    x = k.layers.Dense(9, activation="relu", name="d1")(x)
    outputs = k.layers.Dense(3, activation="softmax", name="out")(x)
    return k.Model(inputs, outputs)


@pytest.mark.parametrize("build", [sequential, functional], ids=["sequential", "functional"])
def test_the_shrunk_model_equals_the_original_with_the_removed_outputs_silenced(build):
    model = build()
    _randomize_statistics(model)
    shrunk, plan = structured.shrink(model, 0.5)
    assert type(shrunk) is type(model)
    assert plan.keep, "something must shrink"
    for name, kept in plan.keep.items():
        assert len(kept) == round(plan.widths[name] * 0.5)
        assert shrunk.get_layer(name).kernel.shape[-1] == len(kept)
    x = np.random.default_rng(1).uniform(-1, 1, (5, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(shrunk(x).numpy(), _silenced(model, plan)(x).numpy(), rtol=1e-5, atol=1e-6)
    assert shrunk.count_params() < model.count_params()


def test_the_weakest_filters_go():
    model = sequential()
    kernel, bias = model.get_layer("c1").get_weights()
    kernel[..., [1, 4, 6]] *= 100.0  # by far the largest L1 norms
    model.get_layer("c1").set_weights([kernel, bias])
    _, plan = structured.shrink(model, 5 / 8)
    assert list(plan.keep["c1"]) == [1, 4, 6]


def test_layers_that_cannot_shrink_are_left_whole_and_named():
    model = functional()
    shrunk, plan = structured.shrink(model, 0.5)
    described = plan.describe()
    assert "feeds `add` (Add)" in described["c1"] and "feeds `add` (Add)" in described["c2"]
    assert "feeds `gain` (Gain)" in described["c3"]
    assert described["gain"] == "left whole: Gain is not a layer kind structured pruning shrinks"
    assert described["out"] == "left whole: it is the model's output"
    assert described["c4"] == "structured: 6 -> 3 filters" and described["d1"] == "structured: 9 -> 4 units"
    for name in ("c1", "c2", "c3", "out"):  # their outputs stay; `out` reads the 4 units d1 kept
        assert shrunk.get_layer(name).kernel.shape[-1] == model.get_layer(name).kernel.shape[-1]
    assert shrunk.get_layer("out").kernel.shape == (4, 3)


def test_a_frozen_backbone_classifier_shrinks_its_head_and_keeps_the_base_whole():
    model, base = models.backbone_classifier("mobilenet_v2_035", (32, 32, 3), 4, dense_units=32)
    shrunk, plan = structured.shrink(model, 0.75)
    assert plan.describe()["dense"] == "structured: 32 -> 8 units"
    assert "nested model" in plan.describe()[base.name]
    new_base = shrunk.get_layer(base.name)
    assert not new_base.trainable
    for expected, kept in zip(base.get_weights(), new_base.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, kept)
    assert shrunk.get_layer("predictions").kernel.shape == (8, 4)


def test_a_subclassed_model_is_refused_in_one_line():
    class Net(k.Model):
        def __init__(self):
            super().__init__()
            self.dense = k.layers.Dense(3)

        def call(self, inputs):
            return self.dense(inputs)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    with pytest.raises(InputError, match="subclassed Keras model.*Sequential or functional"):
        structured.shrink(net, 0.5)


def test_structured_pruning_that_would_shrink_nothing_stops_before_training(digits_dir, trained_model_dir, tmp_path):
    # A classifier whose only layer with a kernel is its output, which is never shrunk.
    config = pr.PruneConfig(prune_method="structured", prune_epochs=1)
    model, meta = models.load(trained_model_dir)
    models.save(k.Sequential([k.Input(model.input_shape[1:]), k.layers.Flatten(),
                              k.layers.Dense(10, activation="softmax", name="predictions")]), tmp_path / "tiny", meta)
    with pytest.raises(InputError, match=r"structured pruning finds no layer it can shrink .*predictions: .*output.*"
                                         r"prune_layer_types \(Conv2D,Dense\), or use prune_method=magnitude"):
        pr.prune(digits_dir, tmp_path / "tiny", config, tmp_path / "out", progress=lambda _: None, verbose=0)
    assert not (tmp_path / "out").exists()


def test_prune_structured_hands_on_a_smaller_faster_dense_model_and_its_int8_file(digits_dir, trained_model_dir, tmp_path):
    config = pr.PruneConfig(prune_method="structured", target_sparsity=0.5, prune_epochs=1, prune_learning_rate=1e-3,
                            prune_quantize="int8")
    report = pr.prune(digits_dir, trained_model_dir, config, tmp_path, progress=lambda _: None, verbose=0)
    model, meta = models.load(tmp_path)
    assert meta.stage == "pruned" and meta.hyperparameters["prune"]["prune_method"] == "structured"
    assert model.get_layer("conv0").kernel.shape[-1] == 16 and model.get_layer("dense").kernel.shape[-1] == 32
    # An ordinary dense model: no zeros to speak of, and the raw file itself is smaller.
    assert report.sparsity["overall"] < 0.01
    assert report.after["parameters"] == model.count_params() < report.before["parameters"] / 3
    assert report.after["size_bytes"] < report.before["size_bytes"] / 2
    assert report.after["accuracy"] > 0.5
    assert (tmp_path / quantize.file_name("int8")).exists() and report.tflite["int8"]["accuracy"] > 0.5
    text = report.markdown()
    assert text.startswith("# Structured pruning: 50% of filters and units removed")
    assert "| conv1 | structured: 64 -> 32 filters |" in text
    assert "| predictions | left whole: it is the model's output |" in text
    assert report.metrics()["size_ratio"] > 2
