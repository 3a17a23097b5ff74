"""Structured pruning: the rebuilt model computes what the original computes with the removed channels
zeroed where they are read (for small models and for every keras.applications backbone, base included),
is smaller, names every layer it leaves whole, and goes through prune() to a dense Keras model and an int8
TFLite file."""

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


def _randomize_statistics(layers):
    rng = np.random.default_rng(0)
    for layer in layers:
        if isinstance(layer, k.layers.BatchNormalization):
            layer.set_weights([w + rng.uniform(0.1, 1.0, w.shape).astype("float32") for w in layer.get_weights()])


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
def test_the_shrunk_model_equals_the_original_with_the_removed_channels_zeroed(build):
    model = build()
    _randomize_statistics(model.layers)
    shrunk, plan = structured.shrink(model, 0.5)
    assert type(shrunk) is type(model)
    assert plan.keep, "something must shrink"
    for name, kept in plan.keep.items():
        assert len(kept) == round(plan.widths[name] * 0.5)
        assert shrunk.get_layer(name).kernel.shape[-1] == len(kept)
    x = np.random.default_rng(1).uniform(-1, 1, (5, 12, 12, 3)).astype("float32")
    masked = structured.masked(model, plan)
    assert np.abs(masked(x).numpy() - model(x).numpy()).max() > 1e-4, "the removed channels must matter"
    np.testing.assert_allclose(shrunk(x).numpy(), masked(x).numpy(), rtol=1e-5, atol=1e-6)
    assert shrunk.count_params() < model.count_params()


def _backbone(name):
    model, base = models.backbone_classifier(name, (32, 32, 3), 4, dense_units=16)
    _randomize_statistics(base.layers)  # statistics away from 0 and 1, so that a mis-sliced BN shows
    return model, base


# One contract for every backbone kftune builds (at 32 px; MobileNetV2 at alpha 0.35), base flattened and shrunk.
@pytest.mark.parametrize("name", ["mobilenet_v2_035", "resnet50", "efficientnet_b0", "vgg16"])
def test_every_backbone_shrinks_through_its_base_and_equals_the_original_with_the_removed_channels_zeroed(name):
    model, base = _backbone(name)
    shrunk, plan = structured.shrink(model, 0.5)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    # The flat graph computes what the nested model computes: nothing removed, nothing zeroed.
    np.testing.assert_allclose(structured.masked(model, structured.Plan([], {}, {}))(x).numpy(), model(x).numpy(),
                               rtol=1e-5, atol=1e-6)
    masked = structured.masked(model, plan)(x).numpy()
    assert np.abs(masked - model(x).numpy()).max() > 1e-4, "the removed channels must matter"
    np.testing.assert_allclose(shrunk(x).numpy(), masked, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(layer, k.Model) for layer in shrunk.layers), "the base is flattened"
    assert shrunk.count_params() < 0.35 * model.count_params()
    # Every group but the output's shrinks: these four bases hold no layer the analysis does not know.
    assert [g.producers for g in plan.groups if g.keep is None] == [["predictions"]]
    assert plan.unknown == {}


@pytest.mark.parametrize("name", ["mobilenet_v2_035", "efficientnet_b0"])
def test_a_base_called_in_inference_mode_stays_in_it_when_flattened_trained_saved_and_loaded(name, tmp_path):
    """Keras' transfer-learning guide trains a base with base.trainable = True, called with training=False.

    Its BatchNormalization (and EfficientNet's stochastic-depth Dropout) must run in
    inference mode in the shrunk model too: otherwise fine-tuning normalizes with
    batch statistics, moves the stored ones, and the model predicts one class.
    """
    model, base = _backbone(name)
    base.trainable = True
    shrunk, _ = structured.shrink(model, 0.3)
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")

    def features(m):  # the base's part: the head's own Dropout does follow `training`
        return k.Model(m.inputs, m.get_layer("pool").output)

    np.testing.assert_array_equal(features(model)(x, training=True).numpy(), features(model)(x, training=False).numpy())
    np.testing.assert_allclose(features(shrunk)(x, training=True).numpy(), features(shrunk)(x, training=False).numpy(),
                               atol=1e-6)
    bns = [layer for layer in shrunk.layers if isinstance(layer, k.layers.BatchNormalization)]
    assert bns and all(layer.trainable for layer in bns), "gamma and beta still train, as in the base"
    before = [layer.moving_mean.numpy().copy() for layer in bns]
    models.compile_model(shrunk, 4, learning_rate=1e-3)
    shrunk.fit(x, np.arange(4), epochs=1, verbose=0)
    assert all(np.array_equal(b, layer.moving_mean.numpy()) for b, layer in zip(before, bns, strict=True))
    folder = models.save(shrunk, tmp_path / "m", models.ModelMeta("x", list("abcd"), [32, 32, 3], {}, stage="pruned"))
    loaded, _ = models.load(folder)
    np.testing.assert_allclose(features(loaded)(x, training=True).numpy(), features(shrunk)(x, training=False).numpy(),
                               atol=1e-5)


def test_residual_and_squeeze_excite_channels_go_together():
    model, _ = _backbone("mobilenet_v2_035")
    plan, _ = structured.plan(model, 0.5)
    groups = {p: g for g in plan.groups for p in g.producers}
    # block_1's projection feeds block_2's Add: one group with block_2's projection.
    assert groups["block_1_project"] is groups["block_2_project"]
    assert "block_2_add" not in groups and "block_2_depthwise" in groups["block_2_expand"].members
    model, _ = _backbone("efficientnet_b0")
    shrunk, plan = structured.shrink(model, 0.5)
    groups = {p: g for g in plan.groups for p in g.producers}
    # The SE expand conv's outputs multiply the block's channels: one group; its reduce conv shrinks alone.
    assert groups["block2a_expand_conv"] is groups["block2a_se_expand"]
    assert groups["block2a_se_reduce"].producers == ["block2a_se_reduce"]
    assert shrunk.get_layer("block2a_se_reshape").target_shape[-1] == len(groups["block2a_se_expand"].keep)
    assert "block2a_bn" in groups["block2a_expand_conv"].members


def test_the_report_rows_name_each_block_and_why():
    model, _ = _backbone("mobilenet_v2_035")
    plan, _ = structured.plan(model, 0.5)
    rows = {row[0]: row for row in plan.blocks()}
    assert rows["block_3_expand"][2] == "24 of 48" and "BN |gamma|" in rows["block_3_expand"][3]
    assert rows["predictions"][2] == "4 of 4" and "model's output" in rows["predictions"][3]


def test_the_weakest_channels_go_by_bn_scale_else_by_kernel_l1():
    model = sequential()
    gamma, *rest = model.get_layer("bn1").get_weights()
    gamma[[1, 4, 6]] *= 100.0  # c1's group holds bn1: its |gamma| ranks the channels, not c1's kernel
    model.get_layer("bn1").set_weights([gamma, *rest])
    kernel, bias = model.get_layer("d1").get_weights()
    kernel[..., [0, 7]] *= 100.0  # d1's group has no BatchNormalization: the L1 norm of its kernel slices
    model.get_layer("d1").set_weights([kernel, bias])
    _, plan = structured.shrink(model, 5 / 8)
    assert list(plan.keep["c1"]) == [1, 4, 6]
    assert {0, 7} <= set(plan.keep["d1"])


def test_a_layer_the_analysis_does_not_know_is_named_and_the_rest_shrinks():
    model = functional()
    _randomize_statistics(model.layers)
    shrunk, plan = structured.shrink(model, 0.5)
    described = plan.describe()
    assert described["gain"] == "left whole: Gain is not a layer kind structured pruning knows"
    assert "reach `gain`, which is left whole" in described["c3"]
    assert "the model's output (`out`)" in described["out"]
    # c1 and c2 meet in `add`: one group of 8 channels, shrunk together.
    assert described["c1"] == described["c2"] == "structured: 8 -> 4 filters"
    assert described["c4"] == "structured: 6 -> 3 filters" and described["d1"] == "structured: 9 -> 4 units"
    assert shrunk.get_layer("c3").kernel.shape == (3, 3, 4, 16)  # reads the 4 kept, keeps its 16 (gain's)
    assert shrunk.get_layer("out").kernel.shape == (4, 3)
    x = np.random.default_rng(1).uniform(-1, 1, (5, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(shrunk(x).numpy(), structured.masked(model, plan)(x).numpy(), rtol=1e-5, atol=1e-6)


def test_prune_layer_types_dense_shrinks_only_the_head():
    model, base = models.backbone_classifier("mobilenet_v2_035", (32, 32, 3), 4, dense_units=32)
    shrunk, plan = structured.shrink(model, 0.75, ["Dense"])
    assert plan.describe()["dense"] == "structured: 32 -> 8 units"
    assert plan.describe()["Conv_1"] == "left whole: Conv2D is not in prune_layer_types"
    for layer in base.layers:
        if layer.weights:
            for expected, kept in zip(layer.get_weights(), shrunk.get_layer(layer.name).get_weights(), strict=True):
                np.testing.assert_array_equal(expected, kept)
            assert not shrunk.get_layer(layer.name).trainable  # the frozen base stays frozen
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
                            prune_quantize="int8", prune_allocation="uniform")
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
    assert "| predictions | left whole: they are the model's output (`predictions`) |" in text
    assert report.metrics()["size_ratio"] > 2


def test_prune_names_a_layer_it_does_not_know_in_the_report_and_prunes_the_rest(digits_dir, trained_model_dir, tmp_path,
                                                                                 monkeypatch):
    # The fine-tuned small_cnn with a user's own layer between its convolutions (its package trusted, as a user would).
    monkeypatch.setenv(models.TRUSTED_ENV, Gain.__module__.split(".")[0])
    model, meta = models.load(trained_model_dir)
    inputs = k.Input(model.input_shape[1:])
    x = inputs
    for layer in model.layers[1:]:
        x = layer(x)
        if layer.name == "conv0":
            x = Gain(name="gain")(x)
    models.save(k.Model(inputs, x), tmp_path / "custom", meta)
    config = pr.PruneConfig(prune_method="structured", target_sparsity=0.5, prune_epochs=1, prune_quantize="",
                            prune_allocation="uniform")
    report = pr.prune(digits_dir, tmp_path / "custom", config, tmp_path / "out", progress=lambda _: None, verbose=0)
    assert report.unknown_layers == {"gain": "Gain is not a layer kind structured pruning knows"}
    text = report.markdown()
    assert "## Per block: channels kept and why" in text
    assert "`gain` (Gain is not a layer kind structured pruning knows)" in text
    assert "reach `gain`, which is left whole" in report.layer_patterns["conv0"]
    assert report.layer_patterns["conv1"] == "structured: 64 -> 32 filters"


def _redundant(kind):
    """A layer `a` of 8 channels whose 4 weakest carry nothing the other 4 do not: 2 are a fifth of channels 0
    and 1, 2 are constants. Its reader `b` is a strided Conv2D without bias before a BatchNormalization (the
    intercept goes to its moving mean) or a Dense layer with a bias; `b`'s output is the model's, so that
    only `a`'s group shrinks."""
    rng = np.random.default_rng(3)
    if kind == "conv":
        inputs = k.Input((11, 11, 3))
        x = k.layers.Conv2D(8, 3, name="a")(inputs)
        x = k.layers.Conv2D(5, 3, strides=2, use_bias=False, name="b")(x)
        outputs = k.layers.BatchNormalization(name="bn")(x)
    else:
        inputs = k.Input((6,))
        x = k.layers.Dense(8, name="a")(inputs)
        outputs = k.layers.Dense(5, name="b")(x)
    model = k.Model(inputs, outputs)
    _randomize_statistics(model.layers)
    kernel, bias = model.get_layer("a").get_weights()
    shape = kernel[..., :4].shape  # kept: |weights| 0.5 to 1.5, so that a fifth of one is always weaker
    kernel[..., :4] = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
    kernel[..., 4:6], bias[4:6] = 0.2 * kernel[..., :2], 0.2 * bias[:2]
    kernel[..., 6:] = 0.0
    bias[6:] = [0.7, -1.3]
    model.get_layer("a").set_weights([kernel, bias])
    shape = (32, *inputs.shape[1:])
    return model, rng.normal(0, 1, shape).astype("float32"), rng.normal(0, 1, shape).astype("float32")


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_reconstruct_refits_a_reader_to_what_its_removed_channels_carried(kind):
    model, images, unseen = _redundant(kind)
    shrunk, plan = structured.shrink(model, 0.5)
    assert list(plan.keep["a"]) == [0, 1, 2, 3], "the weakest four go"
    zeroed = np.abs(shrunk(unseen).numpy() - model(unseen).numpy()).max()
    assert zeroed > 0.1, "the removed channels must matter"
    refits = structured.reconstruct(model, shrunk, plan, images, ridge=1e-9)
    assert [r.layer for r in refits] == ["b"] and refits[0].before > 0.01 and refits[0].after < 1e-6
    # Exact on images it did not see: the kept channels hold everything the removed ones carried.
    np.testing.assert_allclose(shrunk(unseen).numpy(), model(unseen).numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("options", [dict(kernel_size=3, strides=2, padding="same"),
                                     dict(kernel_size=3, dilation_rate=2, padding="same"),
                                     dict(kernel_size=(2, 3), padding="valid"),
                                     dict(kernel_size=1, strides=2, padding="same")],
                         ids=["strided", "dilated", "valid", "pointwise"])
def test_the_rows_a_convolution_multiplies_are_gathered_where_it_computes(options):
    layer = k.layers.Conv2D(4, **options)
    x = np.random.default_rng(5).normal(0, 1, (2, 9, 8, 3)).astype("float32")
    out = layer(x).numpy()
    assert structured._positions(x.shape, layer) == out.shape[:3]
    pick = np.arange(out[..., 0].size)
    rows = structured._linear_rows(x, layer, pick)
    np.testing.assert_allclose(rows @ layer.kernel.numpy().reshape(-1, 4) + layer.bias.numpy(), out.reshape(-1, 4),
                               rtol=1e-5, atol=1e-5)


def test_reconstruct_leaves_a_reader_too_wide_to_solve_for_as_it_is_and_says_so(monkeypatch):
    model, images, _ = _redundant("dense")
    shrunk, plan = structured.shrink(model, 0.5)
    kernel = shrunk.get_layer("b").kernel.numpy()
    monkeypatch.setattr(structured, "RECONSTRUCT_MAX_INPUTS", 3)
    lines = []
    assert structured.reconstruct(model, shrunk, plan, images, progress=lines.append) == []
    np.testing.assert_array_equal(shrunk.get_layer("b").kernel.numpy(), kernel)
    assert lines[-1] == "`b` reads 4 inputs per output, more than 3: not refit (its kept rows stay as they are)"


def test_reconstruct_brings_a_shrunk_backbone_closer_to_the_original_and_never_worsens_a_layer():
    model, _ = _backbone("mobilenet_v2_035")
    shrunk, plan = structured.shrink(model, 0.3)
    rng = np.random.default_rng(4)
    images, unseen = (rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32") for _ in range(2))
    reference = model(unseen).numpy()
    zeroed = np.abs(shrunk(unseen).numpy() - reference).mean()
    refits = structured.reconstruct(model, shrunk, plan, images)
    # Every layer that lost input channels, the expand and project convolutions and the head, is refit.
    assert {r.layer for r in refits} >= {"block_1_expand", "block_1_project", "Conv_1", "dense"}
    assert all(r.after <= r.before + 1e-6 for r in refits)
    assert np.abs(shrunk(unseen).numpy() - reference).mean() < 0.5 * zeroed


def test_a_base_whose_bn_scales_are_untrained_is_named_in_the_plan_and_a_trained_one_is_not():
    """weights=None (or weights made locally) leaves every BN scale at 1.0: the criterion ranks nothing,
    and the report and the prune step say so rather than remove arbitrary channels without a word."""
    model, base = models.backbone_classifier("mobilenet_v2_035", (32, 32, 3), 4, dense_units=16)
    untrained, _ = structured.plan(model, 0.3)
    assert untrained.unranked and structured.UNRANKED in dict((r[0], r[3]) for r in untrained.blocks())[
        untrained.unranked[0]]
    _randomize_statistics(base.layers)  # scales spread as a trained base's are
    trained, _ = structured.plan(model, 0.3)
    assert trained.unranked == [] and all(structured.UNRANKED not in row[3] for row in trained.blocks())


def _one_group_that_matters_and_one_that_does_not():
    """c1's channels reach the output through c3; c2's reach nothing (the output's rows for them are zero)."""
    inputs = k.Input((12, 12, 3))
    x = k.layers.Conv2D(8, 3, name="c1")(inputs)
    x = k.layers.BatchNormalization(name="bn1")(x)
    x = k.layers.ReLU()(x)
    unread = k.layers.Conv2D(12, 3, activation="relu", name="c2")(x)
    read = k.layers.Conv2D(4, 3, activation="relu", name="c3")(x)
    x = k.layers.Concatenate(name="both")([unread, read])
    x = k.layers.GlobalAveragePooling2D()(x)
    model = k.Model(inputs, k.layers.Dense(3, activation="softmax", name="out")(x))
    _randomize_statistics(model.layers)
    kernel, bias = model.get_layer("out").get_weights()
    kernel[:12] = 0  # c2's own channels, read only by the output through the concatenation
    model.get_layer("out").set_weights([kernel * 20, bias])
    return model


def test_sensitivity_measures_each_group_alone_and_the_allocation_spares_the_group_that_matters():
    model = _one_group_that_matters_and_one_that_does_not()
    images = np.random.default_rng(3).uniform(-1, 1, (32, 12, 12, 3)).astype("float32")
    before = model.predict(images, verbose=0)
    measured = structured.sensitivity(model, images)
    np.testing.assert_array_equal(model.predict(images, verbose=0), before)  # the model itself is untouched
    assert measured.levels == structured.SENSITIVITY_LEVELS
    assert set(measured.change) == {"c1", "c2", "c3"} and measured.widths == {"c1": 8, "c2": 12, "c3": 4}
    assert max(measured.change["c2"]) < 1e-6 < min(min(measured.change["c1"]), max(measured.change["c3"]))
    shares = structured.allocate(measured, 0.4)  # 9.6 of 24 channels: c2 alone gives them at 85%
    assert shares["c2"] == 0.85 and shares["c1"] == 0.0
    shrunk, plan = structured.shrink(model, 0.4, shares=shares)
    assert shrunk.get_layer("c2").kernel.shape[-1] == 2 and shrunk.get_layer("c1").kernel.shape[-1] == 8
    np.testing.assert_allclose(shrunk.predict(images, verbose=0), structured.masked(model, plan).predict(images, verbose=0),
                               rtol=1e-4, atol=1e-5)
    rows = {row[0]: row[3] for row in plan.blocks()}
    assert rows["c1"].endswith(structured.SENSITIVE) and rows["c2"].endswith("; 85% by sensitivity")


def test_allocation_takes_channels_where_they_change_the_outputs_least_up_to_the_fraction():
    levels = structured.SENSITIVITY_LEVELS  # 0.1, 0.25, 0.4, 0.55, 0.7, 0.85
    measured = structured.Sensitivity(levels, {"cheap": (0.0, 0.001, 0.002, 0.004, 0.3, 0.5),
                                               "dear": (0.01, 0.5, 0.4, 0.9, 1.0, 2.0)},  # 0.4 made 0.5: non-decreasing
                                      {"cheap": 100, "dear": 100})
    assert structured.allocate(measured, 0.0) == {"cheap": 0.0, "dear": 0.0}
    assert structured.allocate(measured, 0.25) == {"cheap": 0.55, "dear": 0.0}
    assert structured.allocate(measured, 0.3) == {"cheap": 0.55, "dear": 0.1}
    assert structured.allocate(measured, 0.6) == {"cheap": 0.85, "dear": 0.4}  # 0.4's 0.4 counts as 0.5
    assert structured.allocate(measured, 0.99) == {"cheap": 0.85, "dear": 0.85}  # capped at the largest share


def test_prune_structured_shares_channels_by_sensitivity_when_asked(digits_dir, trained_model_dir, tmp_path,
                                                                    monkeypatch):
    # Evaluation batches of 5 images, as 224 px photos are cut to fit memory: the counts must still hold.
    monkeypatch.setattr("kftune.dataset.EVAL_BATCH_BYTES", 5 * 16 * 16 * 4)
    lines = []
    config = pr.PruneConfig(prune_method="structured", target_sparsity=0.5, prune_epochs=1, prune_quantize="",
                            prune_allocation="global")
    checkpoints = tmp_path / "checkpoints"
    report = pr.prune(digits_dir, trained_model_dir, config, tmp_path / "out", checkpoint_dir=checkpoints,
                      progress=lines.append, verbose=0)
    assert any(line.startswith("prune: measuring each channel group's sensitivity on 32 training images")
               for line in lines)
    assert any(line.startswith("prune: refit 3 layers that lost input channels to the dense model's outputs on 64 "
                               "training images") for line in lines), lines
    model, _ = models.load(tmp_path / "out")
    allocated = [row for row in report.groups if "by sensitivity" in row[3] or row[3].endswith(structured.SENSITIVE)]
    assert [row[0] for row in allocated] == ["conv0", "conv1", "dense"]  # all but the output, which stays whole
    kept, widths = zip(*(map(int, row[2].split(" of ")) for row in allocated), strict=True)
    assert sum(widths) - sum(kept) >= 0.45 * sum(widths)  # half of all channels, rounded per group
    assert report.after["parameters"] == model.count_params() < report.before["parameters"]
    # A restarted step reads the measurement kept with the checkpoints, so each level shrinks to the
    # architecture its checkpoint holds, whatever a second measurement would give.
    assert (checkpoints / pr.SENSITIVITY_FILE).exists()
    again_lines = []
    again = pr.prune(digits_dir, trained_model_dir, config, tmp_path / "again", checkpoint_dir=checkpoints,
                     progress=again_lines.append, verbose=0)
    assert not [line for line in again_lines if "sensitivity" in line or line.startswith("prune: refit")], again_lines
    assert again.groups == report.groups
    for a, b in zip(model.weights, models.load(tmp_path / "again")[0].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_auto_allocation_is_global_for_magnitude_and_uniform_for_structured():
    assert pr.PruneConfig().prune_allocation == "auto" and pr.PruneConfig().allocation == "global"
    assert pr.PruneConfig(prune_method="structured").allocation == "uniform"
    assert pr.PruneConfig(prune_method="structured", prune_allocation="global").allocation == "global"
