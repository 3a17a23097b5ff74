"""Ingest: sources, reproducible splits, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kftune import dataset
from kftune.errors import InputError


def _write_folder(root: Path, counts: dict[str, int], size=(12, 10)) -> Path:
    """A folder of class subfolders holding real PNG files."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    return root


def test_bundled_split_is_stratified_and_complete(digits_dir):
    info = dataset.DatasetInfo.load(digits_dir)
    assert info.class_names == [str(i) for i in range(10)]
    assert sum(info.splits.values()) == 1797
    _, test_labels = dataset.load_arrays(digits_dir, "test")
    # Every class is split with the same fraction: each has ~15% of its images in test.
    assert set(np.bincount(test_labels, minlength=10)) <= set(range(25, 30))
    images, labels = dataset.load_arrays(digits_dir, "train")
    assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8
    assert images.max() > 200 and labels.max() == 9


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    fingerprints = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        info = dataset.ingest(dataset.IngestConfig(image_size=8, seed=seed), tmp_path / name, progress=lambda _: None)
        fingerprints.append(info.fingerprint)
    assert fingerprints[0] == fingerprints[1]
    assert fingerprints[0] != fingerprints[2]


def test_separate_processes_ingesting_the_same_data_agree_on_its_fingerprint(tmp_path):
    """The pipeline's ingest pod and `kftune reproduce` are separate processes.

    Protobuf writes an Example's feature map in an order drawn once per process,
    so without deterministic serialization about half of the processes wrote other
    shard bytes for the same images (a rerun was refused as "data changed").
    """
    import subprocess
    import sys

    root = _write_folder(tmp_path / "src", {"cat": 5, "dog": 5}, size=(8, 8))
    script = (
        "import sys; from kftune import dataset; "
        "print(dataset.ingest(dataset.IngestConfig(source=sys.argv[1], image_size=8, validation_fraction=0.2, "
        "test_fraction=0.2), sys.argv[2], progress=lambda _: None).fingerprint)"
    )
    runs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(tmp_path / f"out{i}")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs[0][1][-2000:]
    prints = {out.strip() for out, _ in outputs}
    assert len(prints) == 1 and len(prints.pop()) == 64, prints


def test_folder_source_with_a_corrupt_file_skips_and_counts_it(tmp_path):
    root = _write_folder(tmp_path / "src", {"cat": 8, "dog": 7})
    (root / "cat" / "broken.png").write_bytes(b"not an image")
    info = dataset.ingest(
        dataset.IngestConfig(source=str(root), image_size=8, max_corrupt_fraction=0.2), tmp_path / "out",
        progress=lambda _: None,
    )
    assert info.class_names == ["cat", "dog"]
    assert info.skipped == 1
    assert sum(info.splits.values()) == 15
    images, _ = dataset.load_arrays(tmp_path / "out", "train")
    assert images.shape[1:] == (8, 8, 3)


def test_too_many_corrupt_files_fail(tmp_path):
    root = _write_folder(tmp_path / "src", {"a": 4, "b": 4})
    for i in range(3):
        (root / "a" / f"bad{i}.jpg").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="could not be decoded"):
        dataset.ingest(dataset.IngestConfig(source=str(root), image_size=8), tmp_path / "out", progress=lambda _: None)


def _distinct_images(root: Path, counts: dict[str, int], start: int) -> dict[int, Path]:
    """PNG files whose top-left pixel numbers them (``start``, ``start + 1``, ...), by number."""
    import tensorflow as tf

    files = {}
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for _ in range(count):
            pixels = np.full((8, 8, 3), 128, np.uint8)
            pixels[0, 0] = start
            files[start] = root / name / f"{start}.png"
            files[start].write_bytes(tf.io.encode_png(pixels).numpy())
            start += 1
    return files


def _numbers(folder: Path, split: str) -> dict[int, int]:
    """Image number -> label, of one split of an ingested dataset."""
    images, labels = dataset.load_arrays(folder, split)
    return {int(image[0, 0, 0]): int(label) for image, label in zip(images, labels, strict=True)}


def test_the_keras_split_folder_layout_keeps_its_split_and_its_classes(tmp_path):
    """data/train/<class>/ and data/validation/<class>/, as Keras' flow_from_directory examples keep them.

    Read as class folders, `train` and `validation` became the two classes: a
    model that learned which folder a photo came from.
    """
    root = tmp_path / "src"
    train = _distinct_images(root / "train", {"cats": 10, "dogs": 10}, 0)
    validation = _distinct_images(root / "validation", {"cats": 3, "dogs": 4}, 100)
    (root / "validation" / "notes.txt").write_text("a file beside the class folders")
    lines = []
    info = dataset.ingest(dataset.IngestConfig(source=str(root), image_size=8), tmp_path / "out", progress=lines.append)
    assert info.class_names == ["cats", "dogs"]
    assert _numbers(tmp_path / "out", "validation") == {n: int("dogs" in str(p)) for n, p in validation.items()}
    test, kept = _numbers(tmp_path / "out", "test"), _numbers(tmp_path / "out", "train")
    # The test split is drawn from train/, 15% of each class (at least one), and nothing is in two splits.
    assert sorted(test.values()) == [0, 0, 1, 1]
    assert set(test) | set(kept) == set(train) and not set(test) & set(kept)
    assert all(label == int("dogs" in str(train[n])) for n, label in {**test, **kept}.items())
    assert "ingest: split folders kept as given: train from train/, validation from validation/; test drawn from " \
           "train/ by class" in lines
    assert info.notes[0].startswith("split folders kept as given")

    # With a test folder too, and Keras' other names for the folders, every split is the user's.
    other = tmp_path / "other"
    _distinct_images(other / "training", {"a": 5, "b": 5}, 0)
    _distinct_images(other / "val", {"a": 2, "b": 2}, 50)
    held = _distinct_images(other / "test", {"a": 2, "b": 3}, 80)
    info = dataset.ingest(dataset.IngestConfig(source=str(other), image_size=8), tmp_path / "out2",
                          progress=lambda _: None)
    assert info.splits == {"train": 10, "validation": 4, "test": 5}
    assert set(_numbers(tmp_path / "out2", "test")) == set(held)


def test_what_is_not_image_data_is_left_out_and_said(tmp_path):
    """A folder as people hand it over: zipped on a Mac, a TIFF or two, a WebP, a photo outside any class."""
    root = _write_folder(tmp_path / "src", {"cat": 6, "dog": 6})
    for name in ("cat", "dog"):
        # AppleDouble files carry a photo's name and extension but are metadata; so is __MACOSX/.
        (root / name / "._0.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
        (root / "__MACOSX" / name).mkdir(parents=True)
        (root / "__MACOSX" / name / "._0.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
        (root / name / ".DS_Store").write_bytes(b"\x00" * 8)
        (root / name / ".thumbnails").mkdir()
        (root / name / ".thumbnails" / "0.png").write_bytes((root / name / "0.png").read_bytes())
        (root / name / "scan.tif").write_bytes(b"II*\x00" + b"\x00" * 60)
    (root / "cat" / "photo.webp").write_bytes(_webp(tmp_path))
    (root / "stray.jpg").write_bytes((root / "cat" / "0.png").read_bytes())
    lines = []
    info = dataset.ingest(dataset.IngestConfig(source=str(root), image_size=8), tmp_path / "out", progress=lines.append)
    # Nothing undecodable was met: the metadata never reached the decoder, and the WebP is an image.
    assert info.class_names == ["cat", "dog"] and info.skipped == 0
    assert sum(info.splits.values()) == 13
    assert info.notes == [
        "left out 2 file(s) that are not bmp, gif, jpeg, jpg, png, webp images (.tif: 2): convert them to PNG or "
        "JPEG to train on them",
        "left out macOS metadata (__MACOSX/, 2 '._' file(s)): it is not image data",
        "left out 1 image(s) that are not in a class folder (first: stray.jpg): each image's folder names its class",
    ]
    assert all(f"ingest: {note}" in lines for note in info.notes)


def _webp(tmp_path: Path) -> bytes:
    """A real WebP file (lossless), written by Pillow (matplotlib's dependency)."""
    from PIL import Image

    Image.fromarray(np.full((9, 7, 3), 200, np.uint8)).save(tmp_path / "x.webp", lossless=True)
    return (tmp_path / "x.webp").read_bytes()


def test_tfrecord_source_with_labels_file(tmp_path):
    import tensorflow as tf

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    with tf.io.TFRecordWriter(str(src / "data-00000.tfrecord")) as writer:
        for i in range(12):
            png = tf.io.encode_png(rng.integers(0, 255, (9, 9, 1), dtype=np.uint8)).numpy()
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 2])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    (src / "labels.txt").write_text("left\nright\n")
    info = dataset.ingest(dataset.IngestConfig(source=str(src), image_size=8, channels=1), tmp_path / "out",
                          progress=lambda _: None)
    assert info.class_names == ["left", "right"]
    assert info.shape == (8, 8, 1)
    assert sum(info.splits.values()) == 12


def test_copies_across_splits_are_left_out_and_a_copy_under_two_labels_is_named(tmp_path):
    """A scraped dataset: each photo saved twice, one of them also filed under the wrong class."""
    root = tmp_path / "src"
    files = _distinct_images(root, {"cat": 20, "dog": 20}, 0)
    for n in range(40):
        (files[n].parent / f"copy-{n}.png").write_bytes(files[n].read_bytes())
    (root / "dog" / "misfiled.png").write_bytes(files[3].read_bytes())
    lines = []
    info = dataset.ingest(dataset.IngestConfig(source=str(root), image_size=8), tmp_path / "out", progress=lines.append)
    splits = {split: _numbers(tmp_path / "out", split) for split in dataset.SPLITS}
    # Every photo is in one split only; a copy inside the training split is kept (it leaks nothing).
    assert not set(splits["train"]) & set(splits["validation"]) and not set(splits["test"]) & \
        (set(splits["train"]) | set(splits["validation"]))
    assert set().union(*splits.values()) == set(range(40))
    written = sum(info.splits.values())
    assert written < 81 and info.splits["train"] > len(splits["train"])
    left_out, conflict = info.notes
    assert re.match(r"left out \d+ validation and \d+ test image\(s\) whose pixels repeat an image of an earlier "
                    r"split \(first: .*\.png, a copy of .*\.png\): left in, they would score", left_out)
    assert sum(int(n) for n in re.findall(r"(\d+) (?:validation|test)", left_out)) == 81 - written
    assert re.match(r"1 image\(s\) repeat an image of another class \(first: .*cat/(copy-)?3\.png in `cat` and "
                    r".*dog/misfiled\.png in `dog`\): one of the labels is wrong", conflict)
    assert f"ingest: {conflict}" in lines


def test_an_archive_is_unpacked_and_its_single_top_folder_read(tmp_path):
    """As datasets are downloaded: Keras' flower_photos.tgz, a .zip made on a Mac (with __MACOSX/ beside the data)."""
    import tarfile
    import zipfile

    data = _write_folder(tmp_path / "flower_photos", {"daisy": 5, "tulips": 6})
    (data / "LICENSE.txt").write_text("CC-BY")
    with tarfile.open(tmp_path / "flower_photos.tgz", "w:gz") as t:
        t.add(data, arcname="flower_photos")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        for path in sorted(data.rglob("*")):
            z.write(path, f"photos/{path.relative_to(data)}")
            if path.suffix == ".png":
                z.writestr(f"__MACOSX/photos/{path.parent.name}/._{path.name}", b"\x00\x05\x16\x07" + b"\x00" * 60)
    folder = dataset.ingest(dataset.IngestConfig(source=str(data), image_size=8), tmp_path / "folder",
                            progress=lambda _: None)
    for archive, line in (("flower_photos.tgz", "unpacked flower_photos.tgz (12 files); its data in flower_photos/"),
                          ("photos.zip", "unpacked photos.zip (23 files); its data in photos/")):
        lines = []
        info = dataset.ingest(dataset.IngestConfig(source=str(tmp_path / archive), image_size=8),
                              tmp_path / archive.replace(".", "-"), progress=lines.append)
        # The same images, split the same way: the dataset an archive gives is the folder's.
        assert info.class_names == ["daisy", "tulips"] and info.fingerprint == folder.fingerprint
        assert info.notes == [line] and f"ingest: {line}" in lines


def test_an_archive_that_cannot_be_read_or_reaches_outside_is_refused(tmp_path):
    import io
    import tarfile

    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with tarfile.open(tmp_path / "escape.tar", "w") as t:
        info = tarfile.TarInfo("../outside.png")
        info.size = 3
        t.addfile(info, io.BytesIO(b"png"))
    for name in ("broken.zip", "escape.tar"):
        with pytest.raises(InputError, match=rf"dataset source `.*{name}` is not an archive that can be read \("):
            dataset.ingest(dataset.IngestConfig(source=str(tmp_path / name), image_size=8), tmp_path / "out",
                           progress=lambda _: None)
    assert not (tmp_path.parent / "outside.png").exists()
    # A zip's ../ and absolute names are cut back to names inside the folder (zipfile), never followed.
    import zipfile

    _write_folder(tmp_path / "ok", {"a": 3, "b": 3}, size=(8, 8))
    with zipfile.ZipFile(tmp_path / "escape.zip", "w") as z:
        for path in sorted((tmp_path / "ok").rglob("*.png")):
            z.write(path, f"ok/{path.relative_to(tmp_path / 'ok')}")
        z.writestr("../../outside.png", b"png")
        z.writestr(str(tmp_path.parent / "absolute.png"), b"png")
    with pytest.raises(InputError, match=r"have too few images: `[^`]+` has 1"):  # the absolute name, kept inside
        dataset.ingest(dataset.IngestConfig(source=str(tmp_path / "escape.zip"), image_size=8), tmp_path / "out-zip",
                       progress=lambda _: None)
    assert not (tmp_path.parent / "outside.png").exists() and not (tmp_path.parent.parent / "outside.png").exists()
    assert not (tmp_path.parent / "absolute.png").exists()
    # Ingest unpacks into a temporary folder of its own; into one this test controls, the escapes would land
    # beside it: the tar's is refused, the zip's names are cut back inside.
    tar_work, zip_work = tmp_path / "t" / "work", tmp_path / "z" / "work"
    tar_work.mkdir(parents=True)
    zip_work.mkdir(parents=True)
    with pytest.raises(InputError, match="is not an archive that can be read"):
        dataset._unpack(tmp_path / "escape.tar", "escape.tar", tar_work)
    assert not (tar_work / "outside.png").exists() and not list((tar_work / "unpacked").iterdir())
    dataset._unpack(tmp_path / "escape.zip", "escape.zip", zip_work)
    assert not (zip_work / "outside.png").exists() and not (zip_work.parent / "outside.png").exists()
    assert (zip_work / "unpacked" / "outside.png").read_bytes() == b"png"
    assert (zip_work / "unpacked" / tmp_path.parent.relative_to("/") / "absolute.png").read_bytes() == b"png"

    # What is wrong inside an archive is said of the archive the user gave, not of a temporary folder.
    with zipfile.ZipFile(tmp_path / "loose.zip", "w") as z:
        z.writestr("photos/0.png", b"png")
        z.writestr("photos/1.png", b"png")
    with pytest.raises(InputError, match=rf"^`{tmp_path}/loose\.zip, unpacked, photos/` has no class subfolders"):
        dataset.ingest(dataset.IngestConfig(source=str(tmp_path / "loose.zip"), image_size=8), tmp_path / "out",
                       progress=lambda _: None)


def test_classes_ten_times_apart_are_said_to_be_imbalanced(tmp_path):
    root = _write_folder(tmp_path / "src", {"rare": 5, "common": 60, "usual": 20}, size=(8, 8))
    info = dataset.ingest(dataset.IngestConfig(source=str(root), image_size=8), tmp_path / "out", progress=lambda _: None)
    assert info.notes == ["the classes are imbalanced: `rare` has 3 training images, `common` 42 (14x): accuracy mostly "
                          "measures the large classes; read the evaluation's per-class recall"]
    balanced = _write_folder(tmp_path / "even", {"a": 30, "b": 6}, size=(8, 8))
    assert dataset.ingest(dataset.IngestConfig(source=str(balanced), image_size=8), tmp_path / "out2",
                          progress=lambda _: None).notes == []


def _numbered_shard(path: Path, numbers: range, classes: int) -> None:
    """A TFRecord shard of PNGs whose top-left pixel is the example's number, label number % classes."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for n in numbers:
            pixels = np.full((8, 8, 3), 128, np.uint8)
            pixels[0, 0] = n
            feature = {
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_png(pixels).numpy()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[n % classes])),
                # TensorFlow Datasets stores more features beside them; kftune reads image and label.
                "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"%d.png" % n])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def test_a_tensorflow_datasets_folder_keeps_its_class_names_and_its_split(tmp_path):
    """What `tfds.load('beans')` leaves in ~/tensorflow_datasets/beans/0.1.0/: shards named by split, label.labels.txt."""
    src = tmp_path / "beans" / "0.1.0"
    src.mkdir(parents=True)
    _numbered_shard(src / "beans-train.tfrecord-00000-of-00002", range(0, 12), 3)
    _numbered_shard(src / "beans-train.tfrecord-00001-of-00002", range(12, 24), 3)
    _numbered_shard(src / "beans-test.tfrecord-00000-of-00001", range(100, 106), 3)
    _numbered_shard(src / "beans-extra.tfrecord-00000-of-00001", range(200, 203), 3)
    (src / "label.labels.txt").write_text("angular_leaf_spot\nbean_rust\nhealthy\n")
    (src / "dataset_info.json").write_text("{}")
    lines = []
    info = dataset.ingest(dataset.IngestConfig(source=str(src), image_size=8), tmp_path / "out", progress=lines.append)
    assert info.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert _numbers(tmp_path / "out", "test") == {n: n % 3 for n in range(100, 106)}
    validation, train = _numbers(tmp_path / "out", "validation"), _numbers(tmp_path / "out", "train")
    assert set(validation) | set(train) == set(range(24)) and not set(validation) & set(train)
    assert sorted(validation.values()) == [0, 1, 2]  # 15% of each class's 8 training examples, at least one
    assert info.notes == ["split of the shards' names kept as given: train, test; validation drawn from train by class",
                          "left out the shards of extra: kftune trains, validates and tests on train, validation "
                          "and test"]
    assert all(f"ingest: {note}" in lines for note in info.notes)


def test_shards_named_by_split_and_shards_that_are_not_are_refused(tmp_path):
    _numbered_shard(tmp_path / "train-00000.tfrecord", range(10), 2)
    _numbered_shard(tmp_path / "more.tfrecord", range(10, 20), 2)
    with pytest.raises(InputError, match=r"shards named by split and shards that are not \(more\.tfrecord\)"):
        dataset.ingest(dataset.IngestConfig(source=str(tmp_path), image_size=8), tmp_path / "out",
                       progress=lambda _: None)


def test_gcs_prefix_source(tmp_path, bucket):
    from kftune import storage

    root = _write_folder(tmp_path / "src", {"x": 5, "y": 5})
    client = storage._client()
    for path in root.rglob("*.png"):
        client.bucket(bucket).blob(f"data/{path.relative_to(root).as_posix()}").upload_from_filename(str(path))
    info = dataset.ingest(dataset.IngestConfig(source=f"gs://{bucket}/data", image_size=8), tmp_path / "out",
                          progress=lambda _: None)
    assert info.class_names == ["x", "y"]
    assert sum(info.splits.values()) == 10

    # One object instead of thousands: the same folder uploaded as a .tar.gz.
    import tarfile

    with tarfile.open(tmp_path / "src.tar.gz", "w:gz") as t:
        t.add(root, arcname="src")
    client.bucket(bucket).blob("archives/src.tar.gz").upload_from_filename(str(tmp_path / "src.tar.gz"))
    packed = dataset.ingest(dataset.IngestConfig(source=f"gs://{bucket}/archives/src.tar.gz", image_size=8),
                            tmp_path / "out2", progress=lambda _: None)
    assert packed.fingerprint == info.fingerprint and packed.notes == ["unpacked src.tar.gz (10 files); its data in src/"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"validation_fraction": 0.6, "test_fraction": 0.5}, "at least 10% for training"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"validation_fraction": 1.2}, "validation_fraction"),
        ({"image_size": 4}, "image_size"),
        ({"channels": 2}, "channels"),
        ({"source": "  "}, "source"),
    ],
)
def test_bad_config_is_refused_before_any_work(kwargs, message):
    with pytest.raises(InputError, match=message):
        dataset.IngestConfig(**kwargs)


def test_bad_sources_get_one_clear_line(tmp_path):
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(_write_folder(tmp_path / "one", {"solo": 1, "other": 5})): "`solo` has 1. Each class needs at least 3",
        str(_write_folder(tmp_path / "single", {"only": 5})): "at least 2",
    }
    (tmp_path / "empty").mkdir()
    cases[str(tmp_path / "empty")] = "no class subfolders"
    (tmp_path / "file.png").write_bytes(b"x")
    cases[str(tmp_path / "file.png")] = "is a file"
    for source, message in cases.items():
        with pytest.raises(InputError, match=message):
            dataset.ingest(dataset.IngestConfig(source=source, image_size=8), tmp_path / "out", progress=lambda _: None)


def test_a_folder_that_is_not_a_dataset_is_named(tmp_path):
    with pytest.raises(InputError, match="run the ingest step first"):
        dataset.DatasetInfo.load(tmp_path)


def test_info_json_round_trips(digits_dir):
    info = dataset.DatasetInfo.load(digits_dir)
    assert json.loads((Path(digits_dir) / "info.json").read_text())["fingerprint"] == info.fingerprint
    assert info.fingerprint == dataset.fingerprint(digits_dir)


@pytest.mark.parametrize("budget, cached", [(dataset.EPOCH_CACHE_BYTES, True), (0, False)])
def test_a_small_split_is_read_from_the_shards_once_and_a_large_one_every_epoch(digits_dir, tmp_path, monkeypatch,
                                                                                 budget, cached):
    import shutil

    folder = tmp_path / "digits"
    shutil.copytree(digits_dir, folder)
    info = dataset.DatasetInfo.load(folder)
    monkeypatch.setattr(dataset, "EPOCH_CACHE_BYTES", budget)
    data = dataset.epoch_split(folder, "validation")
    first = [(image.tobytes(), int(label)) for image, label in data.as_numpy_iterator()]
    assert len(first) == info.splits["validation"]
    for shard in folder.glob("validation-*.tfrecord"):
        shard.write_bytes(b"")  # a later epoch that reads the shards again finds them empty
    again = [(image.tobytes(), int(label)) for image, label in data.as_numpy_iterator()]
    # Cached: the same examples in the same order; streamed: the shards are read again, as for a large split.
    assert again == first if cached else again == []
