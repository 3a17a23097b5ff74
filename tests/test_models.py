"""Model families, output heads, and the model file that travels between steps."""

import subprocess
import sys
import textwrap
import zipfile

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


def test_the_same_model_saved_again_has_the_same_content_fingerprint(trained_model_dir, tmp_path):
    """What checkpoints are tied to: the file's MD5 changes with the save date, the model's content does not."""
    import time

    from kftune import storage

    model, meta = models.load(trained_model_dir)
    time.sleep(1.1)  # metadata.json's date_saved has whole seconds
    models.save(model, tmp_path / "again", meta)
    assert storage.md5_base64(tmp_path / "again" / models.MODEL_FILE) != storage.md5_base64(
        trained_model_dir / models.MODEL_FILE)
    assert models.content_fingerprint(tmp_path / "again") == models.content_fingerprint(trained_model_dir)
    model.layers[-1].bias.assign(model.layers[-1].bias + 1e-3)
    models.save(model, tmp_path / "changed", meta)
    assert models.content_fingerprint(tmp_path / "changed") != models.content_fingerprint(trained_model_dir)


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
    with pytest.raises(InputError, match="names module `test_models`"):
        models.load(tmp_path)


def test_a_model_file_naming_an_untrusted_module_is_refused_before_keras_imports_it(tmp_path):
    # tf-keras' safe mode imports a module named in the config before refusing it (CVE-2025-1550's class).
    (tmp_path / "planted_payload.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').write('ran')\nfrom tf_keras.layers import Dense\n")
    k = models.keras()
    inputs = k.Input((4,))
    k.Model(inputs, k.layers.Dense(2)(inputs)).save(tmp_path / "clean.keras")
    planted = tmp_path / "model" / models.MODEL_FILE
    planted.parent.mkdir()
    with zipfile.ZipFile(tmp_path / "clean.keras") as src, zipfile.ZipFile(planted, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                # The model's own entry: tf-keras imports its module to look the class up.
                data = data.replace(b'"module": "tf_keras.src.engine.functional", "class_name": "Functional"',
                                    b'"module": "planted_payload", "class_name": "Planted"')
                assert b"planted_payload" in data
            dst.writestr(item, data)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from kftune import models
        try:
            models.load({str(planted.parent)!r})
        except Exception as e:
            print(type(e).__name__, e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert "InputError" in out and "names module `planted_payload`" in out, out
    assert not (tmp_path / "imported").exists(), "the planted module was imported"
    # Without kftune's look at the config, Keras' own safe-mode load imports it: the test above can fail.
    bare = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        import kftune, tf_keras
        try:
            tf_keras.models.load_model({str(planted)!r}, safe_mode=True)
        except Exception:
            pass
    """)
    subprocess.run([sys.executable, "-c", bare], capture_output=True, timeout=120)
    assert (tmp_path / "imported").exists()


@pytest.mark.parametrize("body, message", [
    ("return None", r"model function `bad_models:build` returned NoneType \(builtins\): it must return an uncompiled tf-keras"),
    ("import keras\n    i = keras.Input(input_shape)\n    return keras.Model(i, keras.layers.Dense(num_classes)(keras.layers.Flatten()(i)))",
     r"returned Functional \(keras.*\): it is a Keras 3 model: build it with tf-keras"),
    ("import tf_keras as k\n    i = k.Input(input_shape)\n    return k.Model(i, k.layers.Dense(5)(k.layers.Flatten()(i)))",
     r"returns outputs of shape \(None, 5\) for 10 classes: its model must end in one output layer of 10"),
])
def test_a_user_model_function_that_returns_no_fitting_model_is_one_line(tmp_path, monkeypatch, body, message):
    name = f"bad_models_{abs(hash(body))}"  # one module per case: Python caches imported modules
    (tmp_path / f"{name}.py").write_text(f"def build(input_shape, num_classes, **_):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match=message.replace("bad_models", name)):
        models.build(f"{name}:build", (8, 8, 3), 10)


def test_a_user_model_function_that_raises_is_named_in_the_error(tmp_path, monkeypatch):
    (tmp_path / "raising.py").write_text("def build(input_shape, num_classes, **_):\n    raise ValueError('bad units')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match=r"model function `raising:build` raised ValueError: bad units"):
        models.build("raising:build", (8, 8, 3), 10)


def test_a_function_that_cannot_take_a_builders_arguments_is_one_line_before_it_runs(tmp_path, monkeypatch):
    (tmp_path / "not_builders.py").write_text("def render(template):\n    open('called', 'w')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"model function `not_builders:render` cannot be called as "
                                         r"fn\(input_shape, num_classes, units=\.\.\.\): too many positional"):
        models.build("not_builders:render", (8, 8, 3), 10, units=4)
    assert not (tmp_path / "called").exists()


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
