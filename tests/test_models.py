"""Model families, output heads, and the model file that travels between steps."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kftune import models
from kftune.errors import InputError


@pytest.mark.parametrize("classes, units, activation, loss", [
    (2, 1, "sigmoid", "binary_crossentropy"),
    (10, 10, "softmax", "sparse_categorical_crossentropy"),
])
def test_output_head_follows_the_number_of_classes(classes, units, activation, loss):
    assert models.output_head(classes) == (units, activation, loss)
    model = models.small_cnn((16, 16, 3), classes)
    assert model.output_shape == (None, units)


def test_binary_problem_trains_with_a_sigmoid_head():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 16, 16, 3)).astype("float32")
    y = (x[:, :8].mean(axis=(1, 2, 3)) > x[:, 8:].mean(axis=(1, 2, 3))).astype("int64")
    model = models.compile_model(models.small_cnn((16, 16, 3), 2), 2, learning_rate=1e-3)
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    predicted = models.predict_classes(model.predict(x, verbose=0))
    assert set(predicted) <= {0, 1}
    assert models.class_probabilities(model.predict(x[:3], verbose=0)).shape == (3, 2)


def test_a_model_saved_by_one_step_loads_in_the_next_process(trained_model_dir, digits_dir):
    """Each KFP step is its own process: the saved model must load there, in safe mode, without kftune state."""
    from kftune import dataset

    x, _ = dataset.load_arrays(digits_dir, "test")
    model, meta = models.load(trained_model_dir)
    expected = model.predict(x[:5].astype("float32"), verbose=0)
    np.save(trained_model_dir.parent / "x.npy", x[:5])
    script = textwrap.dedent(f"""
        import numpy as np
        from kftune import models
        model, meta = models.load({str(trained_model_dir)!r})
        assert meta.stage == "baseline" and meta.family == "small_cnn", meta
        np.save({str(trained_model_dir.parent / "y.npy")!r},
                model.predict(np.load({str(trained_model_dir.parent / "x.npy")!r}).astype("float32"), verbose=0))
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_allclose(np.load(trained_model_dir.parent / "y.npy"), expected, rtol=1e-5, atol=1e-6)
    assert meta.class_names == [str(i) for i in range(10)]


def test_saved_files_hold_no_optimizer_state(trained_model_dir):
    import zipfile

    names = zipfile.ZipFile(trained_model_dir / models.MODEL_FILE).namelist()
    config = zipfile.ZipFile(trained_model_dir / models.MODEL_FILE).read("config.json").decode()
    assert "optimizer" not in " ".join(names)
    assert '"compile_config": null' in config or "compile_config" not in config


def test_a_file_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / models.MODEL_FILE).write_bytes(b"definitely not a zip")
    with pytest.raises(InputError, match="not a loadable Keras model"):
        models.load(tmp_path)
    with pytest.raises(InputError, match="holds no model.keras"):
        models.load(tmp_path / "elsewhere")


def test_lambda_layers_are_refused_in_safe_mode(tmp_path):
    """An artifact cannot smuggle code in through a Lambda layer."""
    k = models.keras()
    inputs = k.Input((4,))
    model = k.Model(inputs, k.layers.Lambda(lambda t: t * 2)(inputs))
    model.save(tmp_path / models.MODEL_FILE)
    with pytest.raises(InputError, match="not a loadable Keras model"):
        models.load(tmp_path)


def test_user_model_function_is_resolved(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import tf_keras as keras
        def tiny(input_shape, num_classes, units=8, **_):
            inputs = keras.Input(input_shape)
            x = keras.layers.Flatten()(inputs)
            x = keras.layers.Dense(units, activation="relu")(x)
            return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    builder = models.resolve_builder("my_models:tiny")
    assert builder((8, 8, 1), 3, units=4).output_shape == (None, 3)
    for name, message in [("nope", "neither a built-in"), ("missing_mod:f", "cannot be imported"),
                          ("my_models:absent", "has no function")]:
        with pytest.raises(InputError, match=message):
            models.resolve_builder(name)


def test_unknown_optimizer_is_named():
    with pytest.raises(InputError, match="optimizer"):
        models.compile_model(models.small_cnn((16, 16, 3), 3), 3, optimizer="adamax")
