"""Serving an export: the SavedModel's signatures and kftune's Servable, against evaluate's own figures."""

import json
from pathlib import Path

import numpy as np
import pytest

from kftune import dataset, evaluate, fixtures, models, quantize, serving
from kftune import export as ex
from kftune.errors import InputError

SIZE = 24  # ingest resizes the 40 px photos: serving must resize them the same way


@pytest.fixture(scope="module")
def jpeg_photos(tmp_path_factory):
    """Photo-like images saved as JPEG files, one folder per class; ingested at SIZE; a small model trained on them.

    Returns (dataset folder, model folder with an int8 TFLite file beside it, test-split files and labels).
    """
    import tensorflow as tf

    source = tmp_path_factory.mktemp("jpegs")
    images, labels = fixtures.photo_arrays(180, size=40, seed=3)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = source / list(fixtures.CLASSES)[label]
        folder.mkdir(exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
    config = dataset.IngestConfig(source=str(source), image_size=SIZE)
    data_dir = tmp_path_factory.mktemp("data")
    info = dataset.ingest(config, data_dir, progress=lambda _: None)
    # The test split's files, in the order ingest wrote them (the same listing and split ingest made).
    listing = dataset._list_source(str(source), data_dir)
    records = listing.records
    test = dataset.split_indices([label for _, label in records], config, listing.class_names)["test"]
    files = [records[i] for i in test]

    tf.keras.utils.set_random_seed(0)
    model = models.compile_model(models.small_cnn(info.shape, info.num_classes), info.num_classes, learning_rate=3e-3)
    x, y = dataset.load_arrays(data_dir, "train")
    model.fit(x.astype("float32"), y, epochs=6, batch_size=32, verbose=0)
    model_dir = models.save(model, tmp_path_factory.mktemp("model"), models.ModelMeta(
        family="small_cnn", class_names=info.class_names, input_shape=list(info.shape), stage="pruned"))
    quantize.quantize(model, ["int8"], model_dir, dataset.load_split(data_dir, "validation"))
    return data_dir, model_dir, files


def _confusion(predicted: list[int], labels: list[int], n: int) -> list[list[int]]:
    matrix = np.zeros((n, n), int)
    for p, t in zip(predicted, labels, strict=True):
        matrix[t, p] += 1
    return matrix.tolist()


def test_the_byte_signature_gives_evaluates_figures_on_the_test_split_as_jpeg_files(jpeg_photos, tmp_path):
    """The JPEG files of the test split, sent as bytes to serving_default, classify exactly as evaluate measured."""
    import tensorflow as tf

    data_dir, model_dir, files = jpeg_photos
    measured = evaluate.evaluate("pruned", model_dir, data_dir)
    uri, _ = ex.export(model_dir, str(tmp_path / "models"), {"source_run": "run-1", "candidate": "pruned"},
                       dataset_dir=data_dir)

    signature = tf.saved_model.load(uri).signatures["serving_default"]
    out = signature(image_bytes=tf.constant([path.read_bytes() for path, _ in files]))
    names = measured.class_names
    predicted = [names.index(label.decode()) for label in out["labels"].numpy()[:, 0]]
    labels = [label for _, label in files]
    assert len(files) == measured.examples
    assert _confusion(predicted, labels, len(names)) == measured.confusion_matrix
    assert np.mean(np.array(predicted) == labels) == pytest.approx(measured.accuracy)
    assert 0.5 < measured.accuracy < 1.0  # a model that learnt something and still errs: the comparison means something
    # scores are the probabilities of labels, best first; top k = 5 of 6 classes.
    scores, probabilities = out["scores"].numpy(), out["probabilities"].numpy()
    assert scores.shape == (len(files), 5) and np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_allclose(scores[:, 0], probabilities.max(axis=1))


def test_servable_of_an_int8_version_runs_the_tflite_file_and_matches_its_evaluation(jpeg_photos, tmp_path):
    data_dir, model_dir, files = jpeg_photos
    measured = evaluate.evaluate_tflite("quantized", model_dir / "model_int8.tflite", data_dir)
    ex.export(model_dir, str(tmp_path / "models"), {"source_run": "run-1", "candidate": "quantized",
                                                   "model_file": "model_int8.tflite"}, dataset_dir=data_dir)

    served = serving.open_version(str(tmp_path / "models"), tmp_path / "work")  # the base: its newest version
    assert (served.runtime, served.candidate, served.model_file) == ("kftune", "quantized", "model_int8.tflite")
    assert type(served._runner.interpreter).__module__.startswith("ai_edge_litert")
    predictions = served.predict([path.read_bytes() for path, _ in files], keys=[path.name for path, _ in files])
    predicted = [measured.class_names.index(p.labels[0]) for p in predictions]
    assert _confusion(predicted, [label for _, label in files], len(measured.class_names)) == measured.confusion_matrix
    assert [p.key for p in predictions] == [path.name for path, _ in files]


def test_the_signatures_take_png_grayscale_any_size_and_pixels(jpeg_photos, tmp_path):
    import tensorflow as tf

    data_dir, model_dir, files = jpeg_photos
    uri, _ = ex.export(model_dir, str(tmp_path / "models"), {"source_run": "run-1"}, dataset_dir=data_dir)
    loaded = tf.saved_model.load(uri)
    image = tf.io.decode_jpeg(files[0][0].read_bytes())
    variants = [tf.io.encode_png(image).numpy(), tf.io.encode_jpeg(tf.image.rgb_to_grayscale(image)).numpy(),
                tf.io.encode_png(tf.cast(tf.image.resize(image, (97, 61)), tf.uint8)).numpy()]
    out = loaded.signatures["serving_keyed"](image_bytes=tf.constant(variants), key=tf.constant(["a", "b", "c"]))
    assert out["labels"].shape == (3, 5) and [k.decode() for k in out["key"].numpy()] == ["a", "b", "c"]
    # The PNG of the same pixels answers as its decoded pixels do through serving_pixels.
    pixels = loaded.signatures["serving_pixels"](images=tf.cast(image, tf.float32)[None])
    np.testing.assert_allclose(out["probabilities"].numpy()[0], pixels["probabilities"].numpy()[0], atol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_default"](image_bytes=tf.constant([b"not an image"]))


@pytest.mark.parametrize("images,message", [
    ([], r"^the request holds no images: send at least one\.$"),
    ([b"x"] * (serving.MAX_BATCH + 1), rf"holds {serving.MAX_BATCH + 1} images, over the limit of {serving.MAX_BATCH}"),
    ([b"GIF89a broken"], r"^image 0 is not an image kftune can decode \(.*\): send a JPEG, PNG, GIF or BMP file\.$"),
    ([b""], r"^image 0 is empty: send the bytes of a JPEG, PNG, GIF or BMP file\.$"),
    # A 100 000 x 100 000 PNG header: refused before anything is decoded.
    ([b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (100_000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"],
     r"^image 0 declares 10000000000 pixels, over the limit of 50000000: send a smaller image\.$"),
], ids=["empty batch", "over the batch limit", "not an image", "empty image", "decompression bomb"])
def test_bad_images_get_one_line_naming_them(jpeg_photos, tmp_path, images, message):
    data_dir, model_dir, _ = jpeg_photos
    ex.export(model_dir, str(tmp_path / "models"), {"source_run": "run-1"}, dataset_dir=data_dir)
    served = serving.open_version(str(tmp_path / "models"), tmp_path / "work")
    with pytest.raises(InputError, match=message) as refused:
        served.predict(images)
    assert "\n" not in str(refused.value)


def test_predict_prints_a_line_per_image_and_names_a_bad_file(jpeg_photos, tmp_path, capsys):
    from pipelines import cli

    data_dir, model_dir, files = jpeg_photos
    base = str(tmp_path / "models")
    ex.export(model_dir, base, {"source_run": "run-1"}, dataset_dir=data_dir)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    images = [str(path) for path, _ in files[:3]]

    assert cli.main(["predict", base, *images, "--top-k", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    served = serving.open_version(base, tmp_path / "work")
    expected = served.predict([Path(f).read_bytes() for f in images], top_k=2)
    assert [(line["file"], line["labels"], line["scores"]) for line in lines] == [
        (f, p.labels, p.scores) for f, p in zip(images, expected, strict=True)]

    assert cli.main(["predict", f"{base}/1", str(bad), images[0]]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{images[0]}\t{expected[0].labels[0]} {expected[0].scores[0]:.4f}"]
    assert f"kftune: error: `{bad}` is not an image kftune can decode" in captured.err

    assert cli.main(["predict", str(tmp_path / "nothing-here"), images[0]]) == 2
    assert "is neither an exported version nor a model base holding one" in capsys.readouterr().err


def test_predict_reads_a_gcs_base_and_refuses_a_version_changed_after_export(jpeg_photos, bucket, tmp_path, capsys):
    """gs:// as a user gives it: the base (newest complete version), downloaded and checked against its manifest."""
    from kftune import storage
    from pipelines import cli

    data_dir, model_dir, files = jpeg_photos
    base = f"gs://{bucket}/models/photos"
    ex.export(model_dir, base, {"source_run": "run-1"}, dataset_dir=data_dir)
    image = str(files[0][0])
    expected = serving.Servable(ex.read_version(f"{base}/1", tmp_path / "local")).predict([files[0][0].read_bytes()])[0]

    assert cli.main(["predict", base, image, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"file": image, "labels": expected.labels[:1],
                                                   "scores": expected.scores[:1]}
    # Someone replaces a file of the version: predict refuses it rather than answering with another model.
    storage._client().bucket(bucket).blob("models/photos/1/model.keras").upload_from_string(b"not the model")
    assert cli.main(["predict", base, image]) == 2
    assert "does not match its MANIFEST.json (size or MD5 differs ['model.keras'])" in capsys.readouterr().err
