"""Pruning: both schedules reach their target, sizes and accuracy are reported truly, the accuracy-budget
search keeps the highest level within budget, TFLite export works, and bad input stops before any work."""

import gzip
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tf_keras

from kftune import dataset, models
from kftune import prune as pr
from kftune.errors import InputError
from pipelines import local_runner


@tf_keras.saving.register_keras_serializable(package="kftune_test")
class Scale(tf_keras.layers.Layer):
    """A custom layer with a trainable weight that tfmot has no pruning rule for."""

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def kernel_sparsity(model) -> dict[str, float]:
    """Share of exact zeros per kernel, counted here rather than by kftune.measure."""
    return {
        layer.name: float(np.mean(layer.kernel.numpy() == 0))
        for layer in model.layers if hasattr(layer, "kernel")
    }


def validation_accuracy(model, folder) -> float:
    x, y = dataset.load_arrays(folder, "validation")
    return float(np.mean(model.predict(x.astype("float32"), verbose=0).argmax(-1) == y))


@pytest.fixture(scope="module")
def prune_once(digits_dir, trained_model_dir, tmp_path_factory):
    """Runs each distinct configuration once for the whole module; returns (report, output folder).

    ``run.lines[fields]`` keeps the progress lines each configuration printed."""
    done = {}

    def run(**fields):
        key = tuple(sorted(fields.items()))
        if key not in done:
            out = tmp_path_factory.mktemp("pruned")
            config = pr.PruneConfig(prune_epochs=1, prune_learning_rate=1e-3, **fields)
            lines = run.lines.setdefault(key, [])
            done[key] = pr.prune(digits_dir, trained_model_dir, config, out, progress=lines.append, verbose=0), out
        return done[key]

    run.lines = {}
    return run


# Every layer to the target (tfmot's own way), so that each layer's sparsity can be checked against it.
CONSTANT_80 = {"target_sparsity": 0.8, "prune_schedule": "constant", "prune_quantize": "dynamic,int8",
               "prune_allocation": "uniform"}
POLYNOMIAL_60 = {"target_sparsity": 0.6, "prune_schedule": "polynomial", "prune_initial_sparsity": 0.1, "prune_frequency": 5,
                 "prune_allocation": "uniform"}


@pytest.mark.parametrize("fields", [CONSTANT_80, POLYNOMIAL_60], ids=["constant", "polynomial"])
def test_both_schedules_reach_the_target_on_the_stripped_weights(prune_once, fields):
    report, out = prune_once(**fields)
    model, meta = models.load(out)
    assert not any("prune_low_magnitude" in layer.name for layer in model.layers), "wrappers left in the export"
    measured = kernel_sparsity(model)
    assert set(measured) == {"conv0", "conv1", "dense", "predictions"}
    for name, value in measured.items():
        assert abs(value - fields["target_sparsity"]) <= 0.01, (name, value)
        assert report.sparsity[name] == pytest.approx(value)
    assert abs(report.sparsity["overall"] - fields["target_sparsity"]) <= 0.01
    assert meta.stage == "pruned" and meta.hyperparameters["prune"]["prune_schedule"] == fields["prune_schedule"]


def test_global_allocation_prunes_the_large_layer_harder_and_reaches_the_target_overall(prune_once, trained_model_dir):
    report, out = prune_once(target_sparsity=0.8)  # prune_allocation="auto": global for magnitude
    measured = kernel_sparsity(models.load(out)[0])
    # One threshold: the 80% quantile of every kernel weight's magnitude in the model before pruning.
    dense, _ = models.load(trained_model_dir)
    kernels = {name: np.abs(dense.get_layer(name).kernel.numpy()) for name in measured}
    threshold = np.quantile(np.concatenate([k.ravel() for k in kernels.values()]), 0.8)
    for name, kernel in kernels.items():
        assert abs(measured[name] - np.mean(kernel <= threshold)) <= 0.01, (name, measured)
    assert measured["dense"] > 0.8 > measured["conv0"], measured  # the Flatten->Dense layer holds most weights
    assert abs(report.sparsity["overall"] - 0.8) <= 0.01
    assert report.layer_patterns["dense"] == f"polynomial {measured['dense']:.0%} (global threshold)"


def test_global_allocation_leaves_a_batch_normalized_layer_at_the_target(digits_dir, tmp_path):
    # A kernel followed by BatchNormalization can be any scale, so its magnitudes are not compared with
    # other layers' (they would send a whole convolution to 99%): it is pruned to the target like tfmot does.
    info = dataset.DatasetInfo.load(digits_dir)
    inputs = tf_keras.Input(shape=info.shape)
    x = tf_keras.layers.Conv2D(8, 3, name="conv")(tf_keras.layers.Rescaling(1 / 255)(inputs))
    x = tf_keras.layers.ReLU()(tf_keras.layers.BatchNormalization(name="norm")(x))
    x = tf_keras.layers.Dense(32, activation="relu", name="dense")(tf_keras.layers.Flatten()(x))
    outputs = tf_keras.layers.Dense(info.num_classes, activation="softmax", name="predictions")(x)
    folder = models.save(models.compile_model(tf_keras.Model(inputs, outputs), info.num_classes), tmp_path / "model",
                         models.ModelMeta("custom", info.class_names, list(info.shape), {"batch_size": 32}))
    report = pr.prune(digits_dir, folder, pr.PruneConfig(target_sparsity=0.8, prune_epochs=1, prune_quantize=""),
                      tmp_path / "out", progress=lambda _: None, verbose=0)
    assert report.layer_patterns["conv"] == "polynomial 80%"
    assert abs(report.sparsity["conv"] - 0.8) <= 0.01
    assert report.layer_patterns["dense"].endswith("(global threshold)")
    assert report.layer_patterns["predictions"].endswith("(global threshold)")
    assert abs(report.sparsity["overall"] - 0.8) <= 0.01


def test_the_report_names_what_tfmot_leaves_dense(digits_dir, tmp_path):
    # tfmot 0.8.1 wraps a DepthwiseConv2D yet prunes none of its weights, and prunes only a SeparableConv2D's
    # pointwise kernel: the pattern column says so instead of claiming the schedule, as the sparsity shows.
    info = dataset.DatasetInfo.load(digits_dir)
    inputs = tf_keras.Input(shape=info.shape)
    x = tf_keras.layers.Conv2D(8, 3, activation="relu", name="conv")(tf_keras.layers.Rescaling(1 / 255)(inputs))
    x = tf_keras.layers.DepthwiseConv2D(3, activation="relu", name="depthwise")(x)
    x = tf_keras.layers.SeparableConv2D(16, 3, activation="relu", name="separable")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_keras.layers.Dense(info.num_classes, activation="softmax", name="predictions")(x)
    folder = models.save(models.compile_model(tf_keras.Model(inputs, outputs), info.num_classes), tmp_path / "model",
                         models.ModelMeta("custom", info.class_names, list(info.shape), {"batch_size": 32}))
    report = pr.prune(digits_dir, folder, pr.PruneConfig(target_sparsity=0.8, prune_allocation="uniform",
                                                         prune_epochs=1, prune_quantize=""),
                      tmp_path / "out", progress=lambda _: None, verbose=0)
    assert report.layer_patterns["depthwise"] == "not pruned: tfmot prunes no weight of a DepthwiseConv2D"
    assert report.sparsity["depthwise"] == 0
    assert report.layer_patterns["separable"] == (
        "polynomial 80%; depthwise_kernel left dense (tfmot prunes only the rest)")
    pruned, _ = models.load(tmp_path / "out")
    separable = pruned.get_layer("separable")
    assert abs(np.mean(separable.pointwise_kernel.numpy() == 0) - 0.8) <= 0.01
    assert np.mean(separable.depthwise_kernel.numpy() == 0) == 0
    assert report.layer_patterns["conv"] == "polynomial 80%"


def test_report_tells_sizes_and_accuracy_as_measured(prune_once, trained_model_dir, digits_dir):
    report, out = prune_once(**CONSTANT_80)
    dense_file, pruned_file = (trained_model_dir / models.MODEL_FILE).read_bytes(), (out / models.MODEL_FILE).read_bytes()
    assert report.before["size_bytes"] == len(dense_file)
    assert report.after["size_bytes"] == len(pruned_file)
    # Zeros are still stored: the raw file does not shrink, the compressed one does.
    assert report.after["size_bytes"] == report.before["size_bytes"]
    assert report.before["gzip_bytes"] == len(gzip.compress(dense_file, compresslevel=9))
    assert report.after["gzip_bytes"] < report.before["gzip_bytes"] / 2.5
    dense, _ = models.load(trained_model_dir)
    pruned, _ = models.load(out)
    assert report.before["accuracy"] == pytest.approx(validation_accuracy(dense, digits_dir), abs=1e-6)
    assert report.after["accuracy"] == pytest.approx(validation_accuracy(pruned, digits_dir), abs=1e-6)
    for values in (report.before, report.after):
        assert values["loss"] > 0 and values["latency_ms_batch1"] > 0 and values["latency_ms_batch32"] > 0
    metrics = report.metrics()
    assert metrics["gzip_ratio"] == pytest.approx(report.before["gzip_bytes"] / report.after["gzip_bytes"])
    assert metrics["accuracy_drop"] == pytest.approx(report.before["accuracy"] - report.after["accuracy"])
    text = report.markdown()
    assert "as large as the dense one" in text and "compressed" in text
    assert f"| {report.after['size_bytes']} | {report.after['gzip_bytes']} |" in text


def _interpreter_accuracy(path, digits_dir) -> tuple[float, np.ndarray, str]:
    """Accuracy of a .tflite file, one image at a time, written here independently of kftune.quantize."""
    from ai_edge_litert.interpreter import Interpreter

    x, y = dataset.load_arrays(digits_dir, "validation")
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    entry, exit_ = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    predicted = []
    for image in x:
        scale, zero_point = entry["quantization"]
        value = np.round(image / scale + zero_point).clip(0, 255) if scale else image
        interpreter.set_tensor(entry["index"], value[None].astype(entry["dtype"]))
        interpreter.invoke()
        predicted.append(int(interpreter.get_tensor(exit_["index"])[0].argmax()))
    predicted = np.array(predicted)
    return float(np.mean(predicted == y)), predicted, np.dtype(entry["dtype"]).name


def test_tflite_dynamic_and_int8_are_exported_and_measured(prune_once, digits_dir):
    report, out = prune_once(**CONSTANT_80)
    pruned, _ = models.load(out)
    x, _ = dataset.load_arrays(digits_dir, "validation")
    keras_predicted = pruned.predict(x.astype("float32"), verbose=0).argmax(-1)
    for mode, input_dtype in (("dynamic", "float32"), ("int8", "uint8")):
        values = report.tflite[mode]
        path = out / values["file"]
        assert path.name == f"model_{mode}.tflite" and path.stat().st_size == values["size_bytes"]
        accuracy, predicted, dtype = _interpreter_accuracy(path, digits_dir)
        assert dtype == input_dtype
        assert values["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert np.mean(predicted == keras_predicted) >= 0.95, f"{mode} disagrees with the Keras model"
        # int8 weights keep the pruned zeros: a quarter of the float file, and compressed further.
        assert values["size_bytes"] < report.after["size_bytes"] / 3
        assert values["gzip_bytes"] < report.after["gzip_bytes"] / 2
        assert report.metrics()[f"tflite_{mode}_accuracy"] == values["accuracy"]
    # The converter's dynamic range leaves kernels under 1024 values (conv0: 3x3x3x32, predictions: 64x10) in float32; the
    # report says so instead of claiming int8 weights throughout. Full int8 quantizes every kernel.
    assert report.tflite["dynamic"]["float_kernels"] == ["conv0", "predictions"]
    assert report.tflite["int8"]["float_kernels"] == []
    assert "dynamic: the TFLite converter left these kernels in float32" in report.markdown()
    assert models.load(out)[0] is not None, "the Keras model must stay loadable beside the .tflite files"


def test_only_the_chosen_layer_types_are_pruned(prune_once):
    report, out = prune_once(target_sparsity=0.7, prune_layer_types="Dense", prune_allocation="uniform")
    measured = kernel_sparsity(models.load(out)[0])
    assert measured["conv0"] < 0.01 and measured["conv1"] < 0.01
    assert abs(measured["dense"] - 0.7) <= 0.01 and abs(measured["predictions"] - 0.7) <= 0.01


def test_structured_2_by_4_leaves_two_zeros_in_every_four_weights(prune_once):
    _, out = prune_once(target_sparsity=0.5, prune_m_by_n="2:4", prune_layer_types="Dense")
    kernel = models.load(out)[0].get_layer("dense").kernel.numpy()
    # tfmot groups 4 consecutive weights along the input axis of a Dense kernel.
    groups = kernel.reshape(-1, 4, kernel.shape[1])
    assert np.all((groups == 0).sum(axis=1) >= 2)


def test_budget_search_bisects_and_keeps_the_highest_sparsity_within_the_budget(prune_once):
    ladder = [0.3, 0.5, 0.8, 0.99]
    report, out = prune_once(prune_max_accuracy_drop=0.03, prune_sparsity_levels="0.99,0.5,0.8,0.3")
    tried = [a["sparsity"] for a in report.attempts]
    assert tried[0] == 0.5, "bisection starts in the middle of the sorted ladder"
    assert len(tried) <= 3, "bisection of 4 levels needs at most 3 tries"
    within = [a["sparsity"] for a in report.attempts if a["within_budget"]]
    assert within, "the ladder's low levels should fit a 3-point budget on this task"
    assert report.target_sparsity == max(within)
    assert all(not a["within_budget"] for a in report.attempts if a["sparsity"] > report.target_sparsity)
    # The level just above the kept one was tried and missed: the search did not stop short of it.
    above = ladder[ladder.index(report.target_sparsity) + 1]
    assert above in tried and not next(a for a in report.attempts if a["sparsity"] == above)["within_budget"]
    kept = next(a for a in report.attempts if a["sparsity"] == report.target_sparsity)
    assert kept["accuracy_drop"] <= 0.03
    assert report.before["accuracy"] - report.after["accuracy"] == pytest.approx(kept["accuracy_drop"], abs=1e-6)
    assert report.within_budget is True
    assert abs(report.sparsity["overall"] - report.target_sparsity) <= 0.01, report.sparsity
    saved = json.loads((out / models.META_FILE).read_text())["hyperparameters"]["prune"]
    assert saved["target_sparsity"] == report.target_sparsity
    assert report.metrics()["within_budget"] == 1.0
    # Each level tried is one headline line under the prune task in `kftune run-local`'s console.
    lines = prune_once.lines[(("prune_max_accuracy_drop", 0.03), ("prune_sparsity_levels", "0.99,0.5,0.8,0.3"))]
    assert len([line for line in lines if local_runner._ECHO.match(line)]) == len(tried), lines


def test_2_by_4_leaves_layers_whose_input_axis_is_no_multiple_of_4_dense_and_says_so(prune_once):
    report, out = prune_once(target_sparsity=0.5, prune_m_by_n="2:4")
    model = models.load(out)[0]
    # conv0 reads 3 colour channels: tfmot would pad each group of 3 to 4 and zero 1 of 3 (33%), not 2 of 4.
    assert "input axis (3) is not a multiple of 4" in report.layer_patterns["conv0"]
    assert kernel_sparsity(model)["conv0"] < 0.01
    for name in ("conv1", "dense", "predictions"):
        assert report.layer_patterns[name] == "2:4"
        kernel = model.get_layer(name).kernel.numpy()
        groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)
        assert np.all((groups == 0).sum(axis=1) == 2), name
    text = report.markdown()
    assert "| conv0 | dense: its input axis (3) is not a multiple of 4, so 2:4 does not apply |" in text
    assert "| conv1 | 2:4 | 50.00% |" in text


def test_budget_search_says_so_when_no_level_fits(prune_once):
    report, out = prune_once(prune_max_accuracy_drop=0.001, prune_sparsity_levels="0.99")
    assert report.within_budget is False and report.target_sparsity == 0.99
    assert report.metrics()["within_budget"] == 0.0
    assert "No level tried stayed within the budget" in report.markdown()
    assert (out / models.MODEL_FILE).exists()


@pytest.mark.parametrize("fields, message", [
    ({"target_sparsity": 1.0}, "`target_sparsity` must be in [0, 1). Received: target_sparsity=1.0"),
    ({"target_sparsity": -0.1}, "`target_sparsity` must be in [0, 1). Received: target_sparsity=-0.1"),
    ({"prune_schedule": "cubic"}, "`prune_schedule` must be one of ('constant', 'polynomial'). Received: prune_schedule='cubic'"),
    ({"prune_layer_types": "Dense,Conv2d"}, "`prune_layer_types`: `Conv2d` is not a Keras layer class"),
    ({"prune_quantize": "float16"}, "`prune_quantize` takes a comma-separated subset of ('dynamic', 'int8')"),
    ({"prune_max_accuracy_drop": 0.01, "prune_sparsity_levels": "0.5,1.2"}, "`prune_sparsity_levels` must be in [0, 1). Received: 1.2"),
    ({"prune_max_accuracy_drop": 0.01, "prune_sparsity_levels": "half"}, "`prune_sparsity_levels` must be comma-separated numbers"),
    ({"prune_m_by_n": "2:4", "target_sparsity": 0.8}, "set target_sparsity=0.5"),
    ({"prune_allocation": "layerwise"}, "`prune_allocation` must be one of ('auto', 'global', 'uniform'). Received: prune_allocation='layerwise'"),
    ({"prune_m_by_n": "2:4", "prune_method": "structured"}, "`prune_m_by_n` is a magnitude-pruning pattern"),
    ({"prune_method": "channels"}, "`prune_method` must be one of ('magnitude', 'structured'). Received: prune_method='channels'"),
    ({"prune_begin_step": 20, "prune_end_step": 10}, "`prune_end_step` must be after `prune_begin_step`"),
])
def test_bad_config_is_rejected_naming_the_input(fields, message):
    with pytest.raises(InputError) as error:
        pr.PruneConfig(**fields)
    assert message in str(error.value)


def test_magnitude_pruning_reaches_into_a_nested_base(digits_dir, tmp_path):
    """backbone=mobilenet_v2 with the default prune settings: tfmot cannot wrap the nested base.

    The step used to stop there, after search and fine-tune had run, telling the user to prune the head
    only. Every layer to prune now means the base's too: it is inlined (structured.flat, held to the
    nested model's outputs for every keras.applications base in test_structured) and its layers pruned.
    A small base stands for keras.applications' here: called with training=False, partly frozen.
    """
    info = dataset.DatasetInfo.load(digits_dir)
    inner = tf_keras.Input(shape=info.shape)
    x = tf_keras.layers.Conv2D(8, 3, name="stem")(tf_keras.layers.Rescaling(1 / 255)(inner))
    x = tf_keras.layers.ReLU()(tf_keras.layers.BatchNormalization(name="stem_bn")(x))
    x = tf_keras.layers.Conv2D(16, 3, name="block")(x)
    base = tf_keras.Model(inner, tf_keras.layers.ReLU()(tf_keras.layers.BatchNormalization(name="block_bn")(x)),
                          name="base")
    base.get_layer("stem").trainable = False  # gradual unfreezing leaves the first layers frozen
    inputs = tf_keras.Input(shape=info.shape)
    x = tf_keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    x = tf_keras.layers.Dense(32, activation="relu", name="dense")(x)
    outputs = tf_keras.layers.Dense(info.num_classes, activation="softmax", name="predictions")(x)
    model = tf_keras.Model(inputs, outputs)
    folder = models.save(models.compile_model(model, info.num_classes), tmp_path / "model",
                         models.ModelMeta("custom", info.class_names, list(info.shape), {"batch_size": 32}))
    report = pr.prune(digits_dir, folder, pr.PruneConfig(target_sparsity=0.6, prune_epochs=1, prune_quantize=""),
                      tmp_path / "out", progress=lambda _: None, verbose=0)
    pruned = models.load(tmp_path / "out")[0]
    assert not any(isinstance(layer, tf_keras.Model) for layer in pruned.layers), "handed on flat"
    assert pruned.count_params() == model.count_params()
    measured = kernel_sparsity(pruned)
    # The base's trainable convolution (followed by BatchNormalization: pruned to the target, as tfmot does).
    assert abs(measured["block"] - 0.6) <= 0.01 and report.layer_patterns["block"] == "polynomial 60%"
    assert report.layer_patterns["predictions"].endswith("(global threshold)")
    assert measured["stem"] == 0 and report.layer_patterns["stem"] == "not pruned: frozen"
    # The base's BatchNormalization stays in inference mode, as it was called: the statistics did not move.
    np.testing.assert_allclose(pruned.get_layer("block_bn").moving_mean.numpy(),
                               base.get_layer("block_bn").moving_mean.numpy())


def test_a_training_split_too_small_for_the_frequency_is_pruned_more_often_not_refused(digits_dir, trained_model_dir,
                                                                                        tmp_path):
    """120 photos at batch 16 are 8 steps an epoch, fewer than the default frequency's 10.

    Refused, the run stopped at prune after search and fine-tune had spent their GPU time (a run-local of a
    user's folder of photos with prune_epochs=1).
    """
    steps = math.ceil(dataset.DatasetInfo.load(digits_dir).splits["train"] / 32)
    lines = []
    report = pr.prune(digits_dir, trained_model_dir, pr.PruneConfig(target_sparsity=0.6, prune_epochs=1,
                                                                    prune_frequency=steps + 1, prune_quantize=""),
                      tmp_path / "out", progress=lines.append, verbose=0)
    assert f"prune: {steps} training steps are too few to prune every {steps + 1} (prune_frequency): pruning " \
           f"every {steps // 4} step(s) instead, 4 turns" in lines
    assert abs(report.sparsity["overall"] - 0.6) <= 0.01


@pytest.mark.parametrize("fields, message", [
    ({"prune_begin_step": 10_000}, "`prune_begin_step`=10000 and `prune_frequency`=10 leave no pruning step"),
    ({"prune_end_step": 10_000}, "`prune_end_step`=10000 is past the end of training"),
    ({"prune_layer_types": "LSTM"}, "`prune_layer_types`=LSTM matches no layer of the model"),
])
def test_a_config_that_cannot_work_on_this_model_stops_before_training(digits_dir, trained_model_dir, tmp_path, fields, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        pr.prune(digits_dir, trained_model_dir, pr.PruneConfig(**fields), tmp_path / "out", progress=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_layer_tfmot_cannot_prune_is_named_with_what_to_do(digits_dir, tmp_path, monkeypatch):
    # The user's own layer lives in their package (here, this module), which they trust by name.
    monkeypatch.setenv(models.TRUSTED_ENV, __name__.split(".")[0])
    info = dataset.DatasetInfo.load(digits_dir)
    inputs = tf_keras.Input(shape=info.shape)
    x = Scale(name="my_scale")(tf_keras.layers.Flatten()(inputs))
    outputs = tf_keras.layers.Dense(info.num_classes, activation="softmax", name="predictions")(x)
    folder = models.save(tf_keras.Model(inputs, outputs), tmp_path / "model",
                         models.ModelMeta("custom", info.class_names, list(info.shape), {"batch_size": 32}))
    with pytest.raises(InputError) as error:
        pr.prune(digits_dir, folder, pr.PruneConfig(), tmp_path / "out", progress=lambda _: None)
    assert "layer `my_scale` (Scale) cannot be pruned by tfmot" in str(error.value)
    assert "set `prune_layer_types`" in str(error.value)
    assert not (tmp_path / "out").exists()
    # The advice works: pruning only the Dense layer goes through.
    report = pr.prune(digits_dir, folder, pr.PruneConfig(prune_layer_types="Dense", prune_epochs=1), tmp_path / "out",
                      progress=lambda _: None, verbose=0)
    assert abs(report.sparsity["predictions"] - 0.5) <= 0.01


def _component_artifacts(tmp_path, digits_dir, trained_model_dir):
    from kfp import dsl

    return {
        "dataset": dsl.Dataset(uri=str(digits_dir)),
        "model": dsl.Model(uri=str(trained_model_dir)),
        "pruned": dsl.Model(uri=str(tmp_path / "pruned")),
        "metrics": dsl.Metrics(uri=str(tmp_path / "metrics")),
        "report_html": dsl.HTML(uri=str(tmp_path / "report.html")),
    }


def _component_parameters(**overrides):
    import dataclasses
    import json

    # The step's settings as the validation step hands them over: the config's fields as JSON.
    return {"config": json.dumps({**dataclasses.asdict(pr.PruneConfig()), **overrides})}


def test_checkpoints_go_to_one_folder_per_settings_data_and_model(digits_dir, trained_model_dir, tmp_path):
    here = pr.checkpoint_location(pr.PruneConfig(checkpoint_uri="gs://b/ck/"), digits_dir, trained_model_dir)
    assert re.fullmatch(r"gs://b/ck/prune/[0-9a-f]{16}", here), here
    # A retried pod: the same folder.
    assert pr.checkpoint_location(pr.PruneConfig(checkpoint_uri="gs://b/ck"), digits_dir, trained_model_dir) == here
    # A rerun that changes only which levels are tried, the budget or the quantization reuses the levels trained.
    assert pr.checkpoint_location(pr.PruneConfig(checkpoint_uri="gs://b/ck", target_sparsity=0.9, prune_quantize="",
                                                 prune_max_accuracy_drop=0.02, prune_sparsity_levels="0.5,0.9"),
                                  digits_dir, trained_model_dir) == here
    # A rerun with other settings or another model trains apart, never into the first run's checkpoints.
    assert pr.checkpoint_location(pr.PruneConfig(checkpoint_uri="gs://b/ck", prune_epochs=9), digits_dir,
                                  trained_model_dir) != here
    other = tmp_path / "other"
    shutil.copytree(trained_model_dir, other)
    model, meta = models.load(other)
    model.layers[-1].bias.assign(model.layers[-1].bias + 1.0)
    models.save(model, other, meta)
    assert pr.checkpoint_location(pr.PruneConfig(checkpoint_uri="gs://b/ck"), digits_dir, other) != here
    assert pr.checkpoint_location(pr.PruneConfig(), digits_dir, trained_model_dir) == ""


def test_a_killed_prune_resumes_its_level_and_does_not_train_a_finished_level_again(
        digits_dir, trained_model_dir, tmp_path, capsys):
    """The budget search as a retried pod runs it: killed while training its second level, started again."""
    checkpoints = tmp_path / "checkpoints"
    fields = dict(prune_method="structured", prune_epochs=8, prune_learning_rate=1e-3, prune_max_accuracy_drop=0.2,
                  prune_sparsity_levels="0.3,0.5")
    script = textwrap.dedent(f"""
        from kftune import prune as pr
        pr.prune({str(digits_dir)!r}, {str(trained_model_dir)!r}, pr.PruneConfig(**{fields!r}),
                 {str(tmp_path / 'killed')!r}, checkpoint_dir={str(checkpoints)!r}, verbose=0)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = checkpoints / "level0.5000.backup"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if any(second.rglob("*.index")):
            time.sleep(0.5)  # let the epoch's checkpoint finish writing
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (checkpoints / "level0.3000.done.json").exists(), "the first level was not finished before the kill"
    assert any(second.rglob("*.index")), "no epoch of the second level finished before the kill"
    assert not (checkpoints / "level0.5000.done.json").exists(), "the search finished before it could be killed"

    capsys.readouterr()
    lines = []
    report = pr.prune(digits_dir, trained_model_dir, pr.PruneConfig(**fields), tmp_path / "resumed",
                      checkpoint_dir=checkpoints, progress=lines.append, verbose=2)
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    # The finished level was measured from its weights; the killed one went on from its last finished epoch.
    assert 1 <= len(trained) < 8, f"the restarted search trained {len(trained)} epochs"
    assert [a["sparsity"] for a in report.attempts] == [0.3, 0.5]
    said = [line for line in lines if "was trained before" in line or "resumes from its checkpoint" in line]
    assert len(said) == 2 and said[0] == ("prune: 30% was trained before (a retried pod, or a rerun with the same "
                                          "checkpoint_uri): measured from its checkpoint, not trained again"), lines
    assert re.fullmatch(r"prune: 50% resumes from its checkpoint after epoch [1-7] of 8", said[1]), said
    assert [line.endswith("read from its checkpoint)") for line in lines if line.startswith(("prune: 30%:", "prune: 50%:"))
            ] == [True, False], lines
    assert not [line for line in lines if line.startswith("prune: refit")], "a resumed level was refit again"
    assert len(report.history["loss"]) == 8  # the kept level's history counts the epochs before the kill, each once
    assert models.load(tmp_path / "resumed")[0].count_params() < models.load(trained_model_dir)[0].count_params()


def test_a_finished_prune_run_again_on_its_checkpoints_trains_nothing_and_hands_on_the_same_model(
        digits_dir, trained_model_dir, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    config = pr.PruneConfig(**CONSTANT_80, prune_epochs=2, prune_learning_rate=1e-3)
    first = pr.prune(digits_dir, trained_model_dir, config, tmp_path / "a", checkpoint_dir=checkpoints,
                     progress=lambda _: None, verbose=0)
    capsys.readouterr()
    again = pr.prune(digits_dir, trained_model_dir, config, tmp_path / "b", checkpoint_dir=checkpoints,
                     progress=lambda _: None, verbose=2)
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    assert again.after["accuracy"] == first.after["accuracy"]
    for a, b in zip(models.load(tmp_path / "a")[0].weights, models.load(tmp_path / "b")[0].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_component_writes_metrics_and_reports(tmp_path, digits_dir, trained_model_dir):
    from components.prune import prune

    artifacts = _component_artifacts(tmp_path, digits_dir, trained_model_dir)
    prune.python_func(**artifacts, **_component_parameters(target_sparsity=0.75, prune_epochs=1, prune_quantize="int8"))
    metrics = artifacts["metrics"].metadata
    assert abs(metrics["sparsity"] - 0.75) <= 0.01
    assert metrics["after_size_bytes"] == metrics["before_size_bytes"]
    assert metrics["after_gzip_bytes"] < metrics["before_gzip_bytes"]
    assert 0 < metrics["tflite_int8_accuracy"] <= 1 and metrics["tflite_int8_gzip_bytes"] < metrics["after_gzip_bytes"]
    assert {"before_accuracy", "after_accuracy", "before_loss", "after_loss", "before_latency_ms_batch1",
            "after_latency_ms_batch32", "tflite_int8_latency_ms_batch32"} <= set(metrics)
    assert artifacts["pruned"].metadata["tflite"] == ["model_int8.tflite"]
    assert (tmp_path / "pruned" / "model_int8.tflite").exists() and models.load(tmp_path / "pruned")[1].stage == "pruned"
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "Pruning to 75% sparsity" in html
    assert "as large as the dense one" in html and "<td>conv1</td>" in html and "model_int8.tflite" in html


def test_component_exits_with_the_input_error_code_on_bad_input(tmp_path, digits_dir, trained_model_dir, capsys):
    from components.prune import prune

    with pytest.raises(SystemExit) as stop:
        prune.python_func(**_component_artifacts(tmp_path, digits_dir, trained_model_dir),
                          **_component_parameters(target_sparsity=1.0))
    assert stop.value.code == 2
    assert "kftune: error: `target_sparsity` must be in [0, 1)" in capsys.readouterr().err


def test_the_run_form_gives_the_image_counts_the_code_uses():
    """The descriptions are docstring text (the run form's), so the counts are typed there: held to the constants."""
    from kftune import parameters

    assert f"on {pr.RECONSTRUCT_IMAGES} training images" in parameters.BY_NAME["prune_method"].description
    assert f"on {pr.SENSITIVITY_IMAGES} training images" in parameters.BY_NAME["prune_allocation"].description
