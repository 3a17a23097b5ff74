"""Fine-tuning: every backbone, weights from files and gs://, the no-internet error, resume after a kill."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kftune import finetune, models
from kftune.errors import InputError


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_every_backbone_builds_preprocesses_and_trains_a_step(name):
    model, base = models.backbone_classifier(name, (16, 16, 1), 3, weights=None, dense_units=8)
    # Grayscale is repeated to RGB and small images are resized to the backbone's minimum.
    assert base.input_shape == (None, 32, 32, 3)
    assert "gray_to_rgb" in [layer.name for layer in model.layers]
    kind = models.BACKBONES[name].preprocessing
    has_preprocess = "preprocess" in [layer.name for layer in model.layers]
    assert has_preprocess == (kind != "none")
    assert not base.trainable
    models.compile_model(model, 3, learning_rate=1e-3)
    x = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 1)).astype("float32")
    history = model.fit(x, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_caffe_preprocessing_matches_keras_applications():
    import tensorflow as tf

    from kftune.layers import CaffePreprocess

    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = models.keras().applications.vgg16.preprocess_input(x.copy())
    np.testing.assert_allclose(CaffePreprocess()(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-4)


def _save_base_weights(path, name="mobilenet_v2"):
    constructor = getattr(models.keras().applications, models.BACKBONES[name].constructor)
    base = constructor(include_top=False, weights=None, input_shape=(32, 32, 3))
    base.save_weights(path)
    return base


def test_weights_from_a_local_file_are_loaded(tmp_path):
    source = _save_base_weights(tmp_path / "base.weights.h5")
    _, base = models.backbone_classifier("mobilenet_v2", (32, 32, 3), 4, weights=str(tmp_path / "base.weights.h5"))
    for expected, loaded in zip(source.get_weights(), base.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, loaded)


def _keras_imagenet_base(name, tmp_path, monkeypatch):
    """The base Keras builds with weights="imagenet", offline: its download is pointed at a file made here."""
    from tf_keras.src.utils import data_utils

    spec = models.BACKBONES[name]
    constructor = getattr(models.keras().applications, spec.constructor)
    arguments = {"include_top": False, "input_shape": (32, 32, 3), **({"alpha": spec.alpha} if spec.alpha else {})}
    stand_in = constructor(weights=None, **arguments)
    rng = np.random.default_rng(0)
    # Non-trivial statistics everywhere (EfficientNet's stem Normalization, every BatchNormalization), so a
    # missing or extra scaling step cannot hide behind mean 0 and variance 1.
    stand_in.set_weights([w + rng.uniform(0.1, 0.5, w.shape).astype(w.dtype) for w in stand_in.get_weights()])
    download = tmp_path / f"{name}_keras_download.h5"
    stand_in.save_weights(download)
    asked = []
    monkeypatch.setattr(data_utils, "get_file", lambda fname, origin, **_: asked.append(origin) or str(download))
    reference = constructor(weights="imagenet", **arguments)
    monkeypatch.undo()
    assert asked, "Keras did not ask for its ImageNet weights: the stand-in was not used"
    return reference


@pytest.mark.parametrize("name", sorted(models.BACKBONES))
def test_weights_saved_from_keras_imagenet_model_give_its_layers_and_features(name, tmp_path, monkeypatch):
    reference = _keras_imagenet_base(name, tmp_path, monkeypatch)
    # What kftune's no-internet error tells a user to do on a machine with internet.
    reference.save_weights(tmp_path / "base.weights.h5")
    _, base = models.backbone_classifier(name, (32, 32, 3), 3, weights=str(tmp_path / "base.weights.h5"))

    def layers(model):
        return [(type(layer).__name__, layer.output_shape) for layer in model.layers]

    assert layers(base) == layers(reference)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    expected = reference(x, training=False).numpy()
    np.testing.assert_allclose(base(x, training=False).numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_weights_that_do_not_fit_are_named(tmp_path):
    _save_base_weights(tmp_path / "vgg.weights.h5", "vgg16")
    with pytest.raises(InputError, match="does not fit MobileNetV2"):
        models.backbone_classifier("mobilenet_v2", (32, 32, 3), 4, weights=str(tmp_path / "vgg.weights.h5"))


def test_no_internet_and_no_weights_uri_fails_at_once_naming_the_parameter(digits_dir, trained_model_dir, tmp_path):
    config = finetune.FinetuneConfig(backbone="mobilenet_v2", weights="imagenet")
    with pytest.raises(InputError, match="set `weights` to a weights file or gs:// URI"):
        finetune.finetune(digits_dir, trained_model_dir, config, tmp_path / "out", progress=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_fine_tune_from_gcs_weights_in_two_phases(digits_dir, trained_model_dir, tmp_path, bucket):
    from kftune import storage

    _save_base_weights(tmp_path / "base.weights.h5")
    storage._client().bucket(bucket).blob("weights/mobilenet_v2.weights.h5").upload_from_filename(
        str(tmp_path / "base.weights.h5"))
    config = finetune.FinetuneConfig(
        backbone="mobilenet_v2", weights=f"gs://{bucket}/weights/mobilenet_v2.weights.h5", finetune_epochs=1,
        unfreeze_epochs=1, unfreeze_layers=10, unfreeze_steps=2, finetune_learning_rate=1e-3,
    )
    result = finetune.finetune(digits_dir, trained_model_dir, config, tmp_path / "out", progress=lambda _: None,
                               verbose=0)
    assert [p["phase"] for p in result.phases] == ["head", "unfreeze1", "unfreeze2"]
    model, meta = models.load(tmp_path / "out")
    assert meta.family == "mobilenet_v2" and meta.stage == "finetuned"
    assert model.output_shape == (None, 10)


def test_continue_training_the_search_winner(digits_dir, trained_model_dir, tmp_path):
    result = finetune.finetune(digits_dir, trained_model_dir, finetune.FinetuneConfig(finetune_epochs=2), tmp_path / "out",
                               progress=lambda _: None, verbose=0)
    assert [p["phase"] for p in result.phases] == ["continue"]
    assert result.hyperparameters["learning_rate"] == 3e-3  # from the search winner's metadata
    assert result.final["val_accuracy"] > 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": "inception"}, "`backbone` must be empty"),
    ({"finetune_epochs": 0}, "epochs"),
    ({"finetune_lr_factor": 2.0}, "finetune_lr_factor"),
    ({"backbone": "vgg16", "weights": ""}, "`weights` is empty"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(InputError, match=message):
        finetune.FinetuneConfig(**kwargs)


def test_a_killed_fine_tune_resumes_from_its_last_finished_epoch(digits_dir, trained_model_dir, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    script = textwrap.dedent(f"""
        from kftune import finetune
        config = finetune.FinetuneConfig(finetune_epochs=8, patience=8)
        finetune.finetune({str(digits_dir)!r}, {str(trained_model_dir)!r}, config, {str(tmp_path / 'killed')!r},
                          checkpoint_dir={str(checkpoints)!r}, verbose=0)
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    backup = checkpoints / "continue.backup"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if backup.exists() and any(backup.rglob("*.index")):
            time.sleep(1.0)  # let the epoch's checkpoint finish writing
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert backup.exists(), "no epoch finished before the kill"
    assert not (checkpoints / "continue.done.json").exists(), "training finished before it could be killed"

    capsys.readouterr()
    result = finetune.finetune(digits_dir, trained_model_dir, finetune.FinetuneConfig(finetune_epochs=8, patience=8),
                               tmp_path / "resumed", checkpoint_dir=checkpoints, progress=lambda _: None, verbose=2)
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]
    assert 1 <= len(trained) < 8, f"resumed run trained {len(trained)} epochs: it started over"
    # The phase's history counts the epochs trained before the kill too, each once.
    assert len(result.phases[0]["history"]["loss"]) == 8
    assert json.loads((checkpoints / "continue.done.json").read_text())["loss"]


def test_reused_checkpoints_of_other_settings_are_refused_not_republished(digits_dir, trained_model_dir, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    first = finetune.FinetuneConfig(finetune_epochs=1, finetune_learning_rate=1e-3)
    finetune.finetune(digits_dir, trained_model_dir, first, tmp_path / "a", checkpoint_dir=checkpoints,
                      progress=lambda _: None, verbose=0)
    # Same settings, same data, same baseline: the finished phase is picked up again (a retried pod).
    again = finetune.finetune(digits_dir, trained_model_dir, first, tmp_path / "b", checkpoint_dir=checkpoints,
                              progress=lambda _: None, verbose=0)
    assert again.phases[0]["history"]["loss"]
    other = finetune.FinetuneConfig(finetune_epochs=3, finetune_learning_rate=3e-3)
    with pytest.raises(InputError, match=r"holds checkpoints of another fine-tune \(finetune_epochs: 1 -> 3; "
                                         r"finetune_learning_rate: 0.001 -> 0.003\): resuming would publish"):
        finetune.finetune(digits_dir, trained_model_dir, other, tmp_path / "c", checkpoint_dir=checkpoints,
                          progress=lambda _: None, verbose=0)
    assert not (tmp_path / "c" / "model.keras").exists()


def test_checkpoints_go_to_one_folder_per_settings_data_and_baseline(digits_dir, trained_model_dir, tmp_path):
    """A rerun with the same checkpoint_uri resumes only from the same start, and never fails on another start."""
    import re
    import shutil

    config = finetune.FinetuneConfig(checkpoint_uri="gs://b/ck/")
    here = finetune.checkpoint_location(config, digits_dir, trained_model_dir)
    assert re.fullmatch(r"gs://b/ck/finetune/[0-9a-f]{16}", here), here
    # The search winner saved again by a rerun (another save date, the same weights): the same folder.
    model, meta = models.load(trained_model_dir)
    time.sleep(1.1)
    models.save(model, tmp_path / "again", meta)
    assert finetune.checkpoint_location(config, digits_dir, tmp_path / "again") == here
    # Another winner, or other settings: a folder of their own, beside the first run's checkpoints.
    shutil.copytree(trained_model_dir, tmp_path / "other")
    model.layers[-1].bias.assign(model.layers[-1].bias + 1.0)
    models.save(model, tmp_path / "other", meta)
    assert finetune.checkpoint_location(config, digits_dir, tmp_path / "other") != here
    assert finetune.checkpoint_location(finetune.FinetuneConfig(checkpoint_uri="gs://b/ck", finetune_epochs=3),
                                        digits_dir, trained_model_dir) != here
    assert finetune.checkpoint_location(finetune.FinetuneConfig(), digits_dir, trained_model_dir) == ""


def _few_shot_dataset(digits_dir, folder, per_class: int):
    """Classes 5-9 of the digits, with only ``per_class`` training images each."""
    from kftune import dataset

    source = dataset.DatasetInfo.load(digits_dir)
    folder.mkdir()
    rng = np.random.default_rng(0)
    counts = {}
    for split in dataset.SPLITS:
        images, labels = dataset.load_arrays(digits_dir, split)
        keep = labels >= 5
        images, labels = images[keep], labels[keep] - 5
        if split == "train":
            chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(5)])
            images, labels = images[chosen], labels[chosen]
        writer = dataset.ShardWriter(folder, split, 4096)
        for image, label in zip(images, labels, strict=True):
            writer.write(image, int(label))
        writer.close()
        counts[split] = writer.count
    dataset.DatasetInfo(class_names=source.class_names[5:], image_size=source.image_size, channels=source.channels,
                        splits=counts).save(folder)
    return folder


def test_fine_tuning_from_pretrained_weights_beats_training_from_scratch(tmp_path, tmp_path_factory):
    """The transfer proof, with no network: pretrain on digits 0-4, fine-tune on 5-9 from ten images a class."""
    import tensorflow as tf

    from kftune import dataset

    k = models.keras()
    digits = tmp_path_factory.mktemp("digits32")
    dataset.ingest(dataset.IngestConfig(image_size=32), digits, progress=lambda _: None)

    # Upstream pretraining, as ImageNet pretraining would be: the whole network on classes 0-4.
    tf.keras.utils.set_random_seed(0)
    x, y = dataset.load_arrays(digits, "train")
    x, y = x[y < 5].astype("float32"), y[y < 5]
    base = k.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    inputs = k.Input((32, 32, 3))
    features = k.layers.GlobalAveragePooling2D()(base(k.layers.Rescaling(1 / 127.5, offset=-1)(inputs)))
    pretrained = k.Model(inputs, k.layers.Dense(5, activation="softmax")(features))
    pretrained.compile(k.optimizers.Adam(2e-3), "sparse_categorical_crossentropy", ["accuracy"])
    pretrained.fit(x, y, epochs=6, batch_size=32, verbose=0)
    # A few hundred steps are too few for BatchNormalization's slow moving averages
    # (momentum 0.999): set them from the data, as a long pretraining would have.
    norms = [layer for layer in base.layers if isinstance(layer, k.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    pretrained(x[:600], training=True)
    base.save_weights(tmp_path / "pretrained.weights.h5")

    few_shot = _few_shot_dataset(digits, tmp_path / "few_shot", per_class=10)
    baseline = tmp_path / "baseline"
    models.save(models.small_cnn((32, 32, 3), 5), baseline,
                models.ModelMeta(family="small_cnn", class_names=list("56789"), input_shape=[32, 32, 3],
                                 hyperparameters={"learning_rate": 2e-3, "batch_size": 16}))
    accuracy = {}
    for weights in (str(tmp_path / "pretrained.weights.h5"), "none"):
        config = finetune.FinetuneConfig(backbone="mobilenet_v2_035", weights=weights, finetune_epochs=25, unfreeze_epochs=5,
                                         unfreeze_layers=10, unfreeze_steps=1, patience=25)
        out = tmp_path / f"tuned-{len(accuracy)}"
        finetune.finetune(few_shot, baseline, config, out, progress=lambda _: None, verbose=0)
        model, _ = models.load(out)
        x_test, y_test = dataset.load_arrays(few_shot, "test")
        accuracy[weights] = float(np.mean(models.predict_classes(model.predict(x_test.astype("float32"), verbose=0))
                                          == y_test))
    transferred, scratch = accuracy.values()
    # Seen here: about 0.51 against 0.20 (chance) from scratch.
    assert transferred >= scratch + 0.2, accuracy
    assert transferred >= 0.4, accuracy


def test_the_validation_step_loads_a_weights_file_into_the_base_before_any_step_trains(tmp_path):
    from kftune import parameters

    _save_base_weights(tmp_path / "base.weights.h5")
    settings = parameters.validate({"backbone": "mobilenet_v2", "weights": str(tmp_path / "base.weights.h5"),
                                    "export_destination": str(tmp_path / "exports")})
    lines = parameters.check_locations(settings)
    assert f"weights: {tmp_path / 'base.weights.h5'} (found; mobilenet_v2's base loads it)" in lines
    # The same file for another backbone is refused there, naming the file and how to make one that fits.
    other = parameters.validate({"backbone": "vgg16", "weights": str(tmp_path / "base.weights.h5"),
                                 "export_destination": str(tmp_path / "exports")})
    with pytest.raises(InputError, match=r"weights file `.*base\.weights\.h5` does not fit VGG16\(include_top=False\)"
                                         r".*Save them with base\.save_weights\(\)"):
        parameters.check_locations(other)
