"""Evaluation on known predictions, the KFP metrics artifacts, gating and the comparison report."""

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from kftune import dataset, models
from kftune import evaluate as ev
from kftune.errors import InputError

# Images are flat grey squares; the class is named for how bright they are.
LEVELS = {"dark": 30, "mid": 128, "bright": 220}


def _rule(brightness):
    """Which class the hand-set model predicts for a mean brightness (see brightness_model)."""
    return np.where(brightness < 75, "dark", np.where(brightness > 180, "bright", "mid"))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """A real ingested dataset with named classes, some images filed under the wrong class.

    The "mid" folder holds four bright images and the "bright" folder two mid
    ones, so a model that judges by brightness makes real, known mistakes.
    """
    import tensorflow as tf

    rng = np.random.default_rng(1)
    source = tmp_path_factory.mktemp("shapes-source")
    misfiled = {"mid": ["bright"] * 4, "bright": ["mid"] * 2, "dark": []}
    for name in LEVELS:
        (source / name).mkdir()
        looks = misfiled[name] + [name] * (10 - len(misfiled[name]))
        for i, look in enumerate(looks):
            pixels = np.clip(LEVELS[look] + rng.integers(-10, 11, (8, 8, 1)), 0, 255).astype(np.uint8)
            (source / name / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    folder = tmp_path_factory.mktemp("shapes")
    config = dataset.IngestConfig(source=str(source), image_size=8, channels=1, validation_fraction=0.1,
                                  test_fraction=0.5, seed=0)
    dataset.ingest(config, folder, progress=lambda _: None)
    return folder


@pytest.fixture(scope="module")
def brightness_model_dir(shapes_dir, tmp_path_factory):
    """A Keras model with hand-set weights: logits are linear in the mean brightness."""
    info = dataset.DatasetInfo.load(shapes_dir)
    k = models.keras()
    inputs = k.Input((8, 8, 1), name="image")
    x = k.layers.GlobalAveragePooling2D(name="mean")(inputs)
    logits = k.layers.Dense(3, name="rule")(x)
    model = k.Model(inputs, k.layers.Softmax(name="probabilities")(logits))
    # dark: 7.5 - 0.1 m, mid: 0, bright: 0.1 m - 18, so dark below 75, bright above 180.
    slope = {"dark": -0.1, "mid": 0.0, "bright": 0.1}
    offset = {"dark": 7.5, "mid": 0.0, "bright": -18.0}
    model.get_layer("rule").set_weights([
        np.array([[slope[c] for c in info.class_names]], np.float32),
        np.array([offset[c] for c in info.class_names], np.float32),
    ])
    folder = tmp_path_factory.mktemp("brightness")
    meta = models.ModelMeta(family="brightness", class_names=info.class_names, input_shape=[8, 8, 1])
    return models.save(model, folder, meta)


def _expected(shapes_dir):
    """Labels, predicted ids and softmax probabilities, worked out from the pixels with numpy alone."""
    info = dataset.DatasetInfo.load(shapes_dir)
    images, labels = dataset.load_arrays(shapes_dir, "test")
    brightness = images.reshape(len(images), -1).mean(axis=1)
    ids = {name: i for i, name in enumerate(info.class_names)}
    predicted = np.array([ids[name] for name in _rule(brightness)])
    slope = np.array([{"dark": -0.1, "mid": 0.0, "bright": 0.1}[c] for c in info.class_names])
    offset = np.array([{"dark": 7.5, "mid": 0.0, "bright": -18.0}[c] for c in info.class_names])
    logits = brightness[:, None] * slope + offset
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return info, labels, predicted, probabilities


# ---------------------------------------------------------------- scores


def test_scores_on_known_outputs_five_classes():
    names = ["a", "b", "c", "d", "e"]
    labels = [0, 1, 2, 3, 4, 0]
    outputs = np.array([
        [0.60, 0.10, 0.10, 0.10, 0.10],  # a -> a
        [0.50, 0.20, 0.15, 0.10, 0.05],  # b -> a, b second
        [0.10, 0.10, 0.60, 0.10, 0.10],  # c -> c
        [0.05, 0.40, 0.30, 0.20, 0.05],  # d -> b, d third
        [0.40, 0.30, 0.20, 0.06, 0.04],  # e -> a, e last
        [0.10, 0.70, 0.10, 0.05, 0.05],  # a -> b, a second
    ])
    s = ev.scores(labels, outputs, names)
    assert s["accuracy"] == pytest.approx(2 / 6)
    assert s["top_k"] == 3
    assert s["top_k_accuracy"] == pytest.approx(5 / 6)
    assert s["confusion_matrix"] == [
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
    ]
    # a predicted 3 times, right once; a twice among the labels, found once.
    assert s["precision"] == pytest.approx([1 / 3, 0, 1, 0, 0])
    assert s["recall"] == pytest.approx([1 / 2, 0, 1, 0, 0])
    assert s["f1"] == pytest.approx([0.4, 0, 1, 0, 0])


def test_scores_binary_sigmoid_head():
    outputs = np.array([[0.1], [0.7], [0.4], [0.9], [0.5], [0.2]])
    labels = [0, 1, 1, 0, 1, 0]  # predicted 0, 1, 0, 1, 1 (0.5 counts as 1, as in models.predict_classes), 0
    s = ev.scores(labels, outputs, ["cat", "dog"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["top_k"] == 1 and s["top_k_accuracy"] == pytest.approx(4 / 6)
    assert s["confusion_matrix"] == [[2, 1], [1, 2]]
    assert s["precision"] == pytest.approx([2 / 3, 2 / 3])
    assert s["recall"] == pytest.approx([2 / 3, 2 / 3])


def test_scores_three_classes_use_top_2():
    s = ev.scores([2, 2], np.array([[0.5, 0.3, 0.2], [0.3, 0.2, 0.5]]), ["x", "y", "z"])
    assert (s["top_k"], s["top_k_accuracy"], s["accuracy"]) == (2, 0.5, 0.5)


def test_scores_refuse_outputs_that_do_not_fit_the_classes():
    with pytest.raises(InputError, match=r"3 classes \['x', 'y', 'z'\]"):
        ev.scores([0, 1], np.zeros((2, 10)), ["x", "y", "z"])


# ---------------------------------------------------------------- evaluate


def test_evaluate_keras_model_with_known_predictions(shapes_dir, brightness_model_dir):
    info, labels, predicted, probabilities = _expected(shapes_dir)
    result = ev.evaluate("baseline", brightness_model_dir, shapes_dir)

    expected_matrix = np.zeros((3, 3), int)
    np.add.at(expected_matrix, (labels, predicted), 1)
    assert 0 < np.trace(expected_matrix) < len(labels), "the data must hold real mistakes to check"
    assert result.confusion_matrix == expected_matrix.tolist()
    assert result.accuracy == pytest.approx(np.mean(predicted == labels))
    assert result.loss == pytest.approx(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])), rel=1e-4)
    assert result.class_names == info.class_names and result.examples == len(labels)
    assert result.parameters == 1 * 3 + 3
    assert result.size_bytes == Path(brightness_model_dir, models.MODEL_FILE).stat().st_size
    assert 0 < result.gzip_bytes < result.size_bytes
    assert result.model_file == "model.keras"
    assert result.latency_ms_batch1 > 0 and result.latency_ms_batch32 > 0
    assert ev.Evaluation.from_json(result.to_json()) == result


def _tflite_beside(model_dir, destination: Path, images, *, int8: bool) -> Path:
    """Copies a Model folder and converts its model to TFLite beside model.keras, as the prune step does."""
    import tensorflow as tf

    shutil.copytree(model_dir, destination)
    model, _ = models.load(destination)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    path = destination / ("model_int8.tflite" if int8 else "model.tflite")
    with warnings.catch_warnings():
        # uint8 input without quantized_input_stats: the calibration above supplies them.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        path.write_bytes(converter.convert())
    return path


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_evaluate_tflite_scores_like_the_keras_model(shapes_dir, brightness_model_dir, tmp_path, int8):
    _, labels, predicted, probabilities = _expected(shapes_dir)
    images, _ = dataset.load_arrays(shapes_dir, "train")
    path = _tflite_beside(brightness_model_dir, tmp_path / "pruned", images, int8=int8)

    result = ev.evaluate_tflite("quantized", path, shapes_dir)

    expected_matrix = np.zeros((3, 3), int)
    np.add.at(expected_matrix, (labels, predicted), 1)
    assert result.confusion_matrix == expected_matrix.tolist()
    assert result.accuracy == pytest.approx(np.mean(predicted == labels))
    # uint8 outputs step by 1/256: the loss moves, but only that much.
    expected_loss = -np.mean(np.log(probabilities[np.arange(len(labels)), labels]))
    assert result.loss == pytest.approx(expected_loss, abs=0.02 if int8 else 1e-4)
    assert result.model_file == path.name and result.size_bytes == path.stat().st_size
    assert result.parameters >= 6  # the kernel and bias, plus whatever constants the converter kept


def test_evaluate_tflite_names_a_missing_file(shapes_dir, brightness_model_dir):
    with pytest.raises(InputError, match="model_int8.tflite` does not exist"):
        ev.evaluate_tflite("quantized", Path(brightness_model_dir, "model_int8.tflite"), shapes_dir)


def test_evaluate_refuses_a_model_trained_on_other_classes(digits_dir, brightness_model_dir):
    with pytest.raises(InputError, match=r"trained on classes \['bright', 'dark', 'mid'\]"):
        ev.evaluate("baseline", brightness_model_dir, digits_dir)


# ---------------------------------------------------------------- component


def test_evaluate_component_scores_every_candidate_and_writes_a_labelled_confusion_matrix(
        shapes_dir, brightness_model_dir, tmp_path, capsys):
    from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model

    from components.evaluate import evaluate

    info, labels, predicted, _ = _expected(shapes_dir)
    out = {"chosen": Model(uri=str(tmp_path / "chosen")), "report_html": HTML(uri=str(tmp_path / "report.html")),
           "metrics": Metrics(uri=str(tmp_path / "metrics")),
           "confusion": ClassificationMetrics(uri=str(tmp_path / "confusion")),
           "per_class": Markdown(uri=str(tmp_path / "per_class")),
           "evaluations": Artifact(uri=str(tmp_path / "evaluations"))}
    model = Model(uri=str(brightness_model_dir))
    verdict = evaluate.python_func(dataset=Dataset(uri=str(shapes_dir)), baseline=model, finetuned=model, pruned=model,
                                   gate_config=json.dumps({"min_accuracy": 0.0, "max_accuracy_drop": 0.01,
                                                           "max_size_bytes": 0}), **out)

    assert verdict == "pass"
    expected_matrix = np.zeros((3, 3), int)
    np.add.at(expected_matrix, (labels, predicted), 1)
    assert out["confusion"].metadata["confusionMatrix"] == {
        "annotationSpecs": [{"displayName": name} for name in ["bright", "dark", "mid"]],
        "rows": [{"row": row} for row in expected_matrix.tolist()],
    }
    saved = json.loads(Path(out["evaluations"].path).read_text())
    assert [e["name"] for e in saved] == ["baseline", "finetuned", "pruned"]  # no int8 file: no quantized candidate
    assert saved[0]["confusion_matrix"] == expected_matrix.tolist()
    assert out["metrics"].metadata["baseline_accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert out["metrics"].metadata["gate_passed"] == 1
    assert out["chosen"].metadata["passed"] is True and (tmp_path / "chosen" / "model.keras").exists()
    assert "no quantized candidate" in capsys.readouterr().out
    # The scalars are the headline figures only; per-class figures are a table beside the confusion matrix.
    assert set(out["chosen"].metadata["metrics"]) == set(ev.Evaluation.SCALARS)
    logged = set(out["metrics"].metadata)
    chosen = {f"chosen_{key}" for key in ev.Evaluation.SCALARS}
    assert chosen <= logged and all(key.endswith(("_accuracy", "_gzip_bytes")) for key in logged - chosen - {"gate_passed"})
    assert not any(word in key for key in logged for word in ("precision", "recall", "f1", "top_k_accuracy_")), logged
    assert "chosen_top_k" not in logged
    table = Path(out["per_class"].path).read_text()
    assert "| class | precision | recall | F1 | test images |" in table
    assert all(f"| {name} |" in table for name in ["bright", "dark", "mid"])


# ---------------------------------------------------------------- gate


def _candidate(name, accuracy, gzip_bytes, **changes):
    values = dict(
        name=name, accuracy=accuracy, loss=1 - accuracy, top_k=3, top_k_accuracy=min(1.0, accuracy + 0.05),
        class_names=["bright", "dark", "mid"], precision=[accuracy] * 3, recall=[accuracy] * 3, f1=[accuracy] * 3,
        confusion_matrix=[[1, 0, 0], [0, 1, 0], [0, 0, 1]], size_bytes=gzip_bytes * 2, gzip_bytes=gzip_bytes,
        parameters=1000, latency_ms_batch1=1.0, latency_ms_batch32=5.0, examples=100,
    )
    return ev.Evaluation(**{**values, **changes})


CANDIDATES = [_candidate("baseline", 0.90, 40_000), _candidate("finetuned", 0.95, 90_000),
              _candidate("pruned", 0.945, 30_000)]


def test_gate_picks_the_smallest_candidate_that_passes():
    decision = ev.choose(CANDIDATES, ev.GateConfig(min_accuracy=0.9, max_accuracy_drop=0.01))
    assert decision == ev.Decision("pruned", True, [])


def test_gate_skips_a_candidate_that_fails_and_names_the_threshold():
    gate = ev.GateConfig(min_accuracy=0.9, max_accuracy_drop=0.01, max_size_bytes=50_000)
    small_but_worse = [*CANDIDATES[:2], _candidate("pruned", 0.88, 30_000)]
    assert gate.failures(small_but_worse[2], small_but_worse[0]) == [
        "pruned: accuracy 0.8800 < min_accuracy 0.9",
        "pruned: accuracy drop 0.0200 against baseline > max_accuracy_drop 0.01",
    ]
    assert gate.failures(CANDIDATES[1], CANDIDATES[0]) == ["finetuned: gzip size 90000 B > max_size_bytes 50000"]
    decision = ev.choose(small_but_worse, gate)
    assert decision.passed and decision.chosen == "baseline"


def test_gate_fails_when_nothing_passes_and_says_why():
    decision = ev.choose(CANDIDATES, ev.GateConfig(min_accuracy=0.99))
    assert not decision.passed
    assert decision.chosen == "finetuned"  # the most accurate is named
    assert decision.reasons == [f"{c.name}: accuracy {c.accuracy:.4f} < min_accuracy 0.99" for c in CANDIDATES]
    assert "NOT EXPORTED" in decision.message() and "min_accuracy 0.99" in decision.message()


@pytest.mark.parametrize("field,value", [("min_accuracy", 1.5), ("max_accuracy_drop", -0.1), ("max_size_bytes", -1)])
def test_gate_config_names_a_bad_threshold(field, value):
    with pytest.raises(InputError, match=f"Received: {field}={value}"):
        ev.GateConfig(**{field: value})


def test_choose_refuses_duplicate_names():
    with pytest.raises(InputError, match="candidate names must differ"):
        ev.choose([CANDIDATES[0], CANDIDATES[0]], ev.GateConfig())


# ---------------------------------------------------------------- compare


GATE = dict(min_accuracy=0.9, max_accuracy_drop=0.01, max_size_bytes=0)


def test_the_smallest_passing_candidate_is_chosen_and_the_report_shows_every_one():
    gate = ev.GateConfig(**GATE)
    decision = ev.choose(CANDIDATES, gate)
    assert decision.passed and decision.chosen == "pruned"
    page = ev.comparison_html(CANDIDATES, gate, decision)
    for c in CANDIDATES:
        assert f"<b>{c.name}</b>" in page and f"/ {c.gzip_bytes / 1024:.1f}</td>" in page
    # The gate's verdict sits beside each candidate's name: visible however narrow the pane.
    assert page.index("<th>gate</th>") < page.index("<th>accuracy</th>")
    assert page.count("<span class='pass'>passes</span>") == 3 and "<br><b>chosen</b>" in page
    assert 'src="data:image/png;base64,' in page


def test_the_candidates_table_shows_the_parameter_and_latency_change_against_the_baseline():
    shrunk = _candidate("pruned", 0.945, 30_000, parameters=250, latency_ms_batch32=2.0)
    page = ev.comparison_html([*CANDIDATES[:2], shrunk], ev.GateConfig(**GATE), ev.choose(CANDIDATES, ev.GateConfig(**GATE)))
    assert "250<br><small>4.00x fewer</small>" in page and "1 / 2<br><small>2.50x faster</small>" in page
    assert "1,000</td>" in page  # the baseline and an unchanged candidate: no factor


def test_per_class_figures_are_a_table_of_the_chosen_candidate_and_every_f1():
    table = ev.per_class_markdown(CANDIDATES[2], CANDIDATES)
    assert "## Per class: pruned" in table
    assert "| bright | 0.945 | 0.945 | 0.945 | 1 |" in table
    assert "| class | baseline | finetuned | pruned |" in table and "| mid | 0.900 | 0.950 | 0.945 |" in table


def test_the_quantized_candidate_can_be_chosen():
    quantized = _candidate("quantized", 0.94, 10_000, model_file="model_int8.tflite")
    assert ev.choose([*CANDIDATES, quantized], ev.GateConfig(**GATE)).chosen == "quantized"


def test_a_failed_gate_runs_the_else_branch_which_names_each_missed_threshold(tmp_path, capsys):
    from kfp.dsl import Artifact, Markdown

    from components.evaluate import gate_failed

    evaluations = tmp_path / "evaluations"
    evaluations.write_text(json.dumps([json.loads(c.to_json()) for c in CANDIDATES]))
    report = Markdown(uri=str(tmp_path / "report.md"))
    uri, chosen = gate_failed.python_func(
        evaluations=Artifact(uri=str(evaluations)), report=report,
        gate_config=json.dumps({"min_accuracy": 0.0, "max_accuracy_drop": 0.01, "max_size_bytes": 20_000}))
    assert uri == "" and chosen in {c.name for c in CANDIDATES}
    text = Path(report.path).read_text()
    assert "Not exported" in text
    assert "pruned: gzip size 30000 B > max_size_bytes 20000" in text
    assert "baseline: gzip size 40000 B > max_size_bytes 20000" in text
    assert "NOT EXPORTED" in capsys.readouterr().out


def test_real_evaluations_name_an_accuracy_drop(shapes_dir, brightness_model_dir):
    measured = ev.evaluate("baseline", brightness_model_dir, shapes_dir)
    worse = dataclasses.replace(measured, name="finetuned", accuracy=measured.accuracy - 0.2)
    pruned = dataclasses.replace(measured, name="pruned", gzip_bytes=measured.gzip_bytes // 2)
    gate = ev.GateConfig(min_accuracy=0.0, max_accuracy_drop=0.05)
    decision = ev.choose([measured, worse, pruned], gate)
    assert decision.passed and decision.chosen == "pruned"
    assert "<span class='fail'>fails</span><br>accuracy drop 0.2000 against baseline &gt; max_accuracy_drop 0.05" in ev.comparison_html(
        [measured, worse, pruned], gate, decision)


@pytest.mark.parametrize("gate", [ev.GateConfig(**GATE), ev.GateConfig(min_accuracy=0.97, max_size_bytes=95_000)])
def test_the_size_plot_names_every_candidate_inside_its_axes(gate):
    from kftune import report

    quantized = _candidate("quantized", 0.94, 10_000, model_file="model_int8.tflite")
    fig = ev._size_plot([*CANDIDATES, quantized], gate)
    fig.canvas.draw()
    (ax,) = fig.axes
    names = {t.get_text(): t.get_window_extent() for t in ax.texts}
    assert set(names) == {"baseline", "finetuned", "pruned", "quantized"}
    box = ax.get_window_extent()
    report.pyplot().close(fig)
    for name, extent in names.items():
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, name
