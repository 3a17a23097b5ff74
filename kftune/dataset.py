"""Ingesting image classification data and reading it back as ``tf.data``.

A kftune dataset is a folder: ``info.json`` (class names, image size, split
sizes, fingerprint) and TFRecord shards of fixed-size uint8 images, one set of
shards per split (``train``, ``validation``, ``test``). Every later step reads
that folder, so ingest is the one place that decodes, resizes and splits.

Sources: the bundled dataset (scikit-learn's handwritten digits, upscaled; it
ships inside scikit-learn, so no network is needed), a folder with one
subfolder per class (or Keras' ``flow_from_directory`` layout, ``train/<class>/``
and ``validation/<class>/``, whose split is kept), TFRecord shards with ``image``
(encoded PNG/JPEG) and ``label`` (int64) features (a TensorFlow Datasets folder
as it is), a ``.zip`` or ``.tar.gz`` archive of any of them, or a ``gs://``
prefix or object holding any of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from kftune import storage
from kftune.errors import InputError, check_numbers, check_whole_numbers

log = logging.getLogger(__name__)

BUNDLED = "bundled:digits"
SPLITS = ("train", "validation", "test")
# The formats tf.io.decode_image reads (the exported model's serving signature decodes with it too).
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# Folder names that hold a split, not a class: Keras' flow_from_directory and
# image_dataset_from_directory examples keep data/train/<class>/ beside
# data/validation/<class>/. Read as classes, they would train a model that tells
# the training folder from the validation folder.
SPLIT_FOLDERS = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
                 "valid": "validation", "test": "test", "testing": "test"}
# What macOS adds when it zips a folder or copies it to another disk: AppleDouble
# metadata (`__MACOSX/`, and `._name.jpg` beside each file), never an image.
MACOS_FOLDER, MACOS_PREFIX = "__MACOSX", "._"
INFO_FILE = "info.json"


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """How to read and split a dataset.

    Attributes:
        source: ``bundled:digits``, a local folder, or a ``gs://`` prefix. A
            folder holds one subfolder of images per class, Keras' split
            layout (``train/<class>/``, ``validation/<class>/``, optionally
            ``test/<class>/``; that split is kept), or ``*.tfrecord`` shards
            with ``image`` and ``label`` features (and optionally a
            ``labels.txt`` with one class name per line; a TensorFlow
            Datasets folder works as it is, its split kept). A ``.zip`` or
            ``.tar.gz`` file (local or ``gs://``) is unpacked and read as the
            folder it holds.
        image_size: Images are resized to ``image_size`` x ``image_size``.
        channels: 1 (grayscale) or 3 (RGB; what pretrained backbones expect).
        validation_fraction: Share of each class held out for validation.
        test_fraction: Share of each class held out for the final test.
        seed: Seeds the split and every later step's shuffling, augmentation and
            initialisation: the same seed gives the same run.
        shard_size: Examples per TFRecord shard.
        max_corrupt_fraction: Undecodable images are skipped and counted;
            ingest fails when more than this share of the images are bad.
        folds: The search's k-fold cross-validation (the search's parameter):
            ingest, the first step that counts each class's training images,
            refuses a split with fewer of them than folds, before any search worker starts.
    """

    source: str = BUNDLED
    image_size: int = 32
    channels: int = 3
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    shard_size: int = 4096
    max_corrupt_fraction: float = 0.05
    folds: int = 1

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise InputError(f"`source` is empty: give bundled:digits, a folder, or a gs:// prefix. Received: {self.source!r}")
        storage.check_location(self.source, "source")
        check_whole_numbers(self, {"image_size": None, "channels": None, "seed": 0, "shard_size": None, "folds": 1})
        check_numbers(self, ("validation_fraction", "test_fraction", "max_corrupt_fraction"))
        if not 8 <= self.image_size <= 1024:
            raise InputError(f"`image_size` must be between 8 and 1024. Received: image_size={self.image_size}")
        if self.channels not in (1, 3):
            raise InputError(f"`channels` must be 1 or 3. Received: channels={self.channels}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise InputError(f"`{name}` must be between 0 and 1 (exclusive). Received: {name}={value}")
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise InputError(
                "`validation_fraction` + `test_fraction` must leave at least 10% for training. "
                f"Received: {self.validation_fraction} + {self.test_fraction}"
            )
        if self.shard_size < 1:
            raise InputError(f"`shard_size` must be at least 1. Received: shard_size={self.shard_size}")
        if not 0.0 <= self.max_corrupt_fraction < 1.0:
            raise InputError(
                f"`max_corrupt_fraction` must be in [0, 1). Received: {self.max_corrupt_fraction}"
            )


@dataclasses.dataclass
class DatasetInfo:
    """What ``info.json`` records about a kftune dataset folder."""

    class_names: list[str]
    image_size: int
    channels: int
    splits: dict[str, int]
    source: str = ""
    seed: int = 0
    fingerprint: str = ""
    skipped: int = 0
    # What ingest left out of the source, or kept as the source gave it (a split-folder layout).
    notes: list[str] = dataclasses.field(default_factory=list)
    # Set when the training split must be augmented online (see kftune.augment).
    augment: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def save(self, folder: str | Path) -> None:
        Path(folder, INFO_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> DatasetInfo:
        path = Path(folder, INFO_FILE)
        if not path.exists():
            raise InputError(f"`{folder}` is not a kftune dataset (no {INFO_FILE}): run the ingest step first.")
        return cls(**json.loads(path.read_text()))


# ---------------------------------------------------------------- sources


def _bundled_digits() -> tuple[list[str], list[tuple[object, int]]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images with values 0..16; scale to the full uint8 range.
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    return [str(c) for c in digits.target_names], [
        (image, int(label)) for image, label in zip(images, digits.target, strict=True)
    ]


@dataclasses.dataclass
class _Listing:
    """What a source holds, listed but not decoded.

    Attributes:
        class_names: The classes, in label order.
        records: (image or where to read it, label) pairs.
        damaged: TFRecord records whose checksum fails (skipped and counted).
        folders: In a split-folder layout, the split each record's folder names; None otherwise.
        notes: Lines for the step's log and summary: what was left out, and what was kept as given.
    """

    class_names: list[str]
    records: list[tuple[object, int]]
    damaged: int = 0
    folders: list[str] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def _subfolders(folder: Path) -> list[Path]:
    """A folder's subfolders that can hold images: not hidden, not macOS metadata."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != MACOS_FOLDER)


class _Files:
    """Image files under class folders, and a count of everything else that was left out."""

    def __init__(self):
        self.macos = 0
        self.other: dict[str, int] = {}
        self.loose: list[Path] = []

    def images(self, class_dir: Path) -> list[Path]:
        found = []
        for path in sorted(class_dir.rglob("*")):
            parts = path.relative_to(class_dir).parts
            if not path.is_file() or any(part.startswith(".") and not part.startswith(MACOS_PREFIX) for part in parts):
                continue  # hidden folders and files (.DS_Store, .ipynb_checkpoints/): not the user's data
            if path.name.startswith(MACOS_PREFIX):
                self.macos += 1
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
            else:
                suffix = path.suffix.lower() or "no extension"
                self.other[suffix] = self.other.get(suffix, 0) + 1
        return found

    def look_beside(self, folder: Path) -> None:
        """Counts the image files that sit in ``folder`` itself, outside every class folder."""
        self.loose += sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                             and not p.name.startswith("."))

    def notes(self, root: Path) -> list[str]:
        notes = []
        if self.other:
            kinds = ", ".join(f"{suffix}: {count}" for suffix, count in sorted(self.other.items(), key=lambda kv: -kv[1]))
            notes.append(f"left out {sum(self.other.values())} file(s) that are not "
                         f"{', '.join(sorted(s.lstrip('.') for s in IMAGE_SUFFIXES))} images ({kinds}): "
                         "convert them to PNG or JPEG to train on them")
        if self.macos or (root / MACOS_FOLDER).is_dir():
            notes.append(f"left out macOS metadata ({MACOS_FOLDER}/, {self.macos} '{MACOS_PREFIX}' file(s)): "
                         "it is not image data")
        if self.loose:
            notes.append(f"left out {len(self.loose)} image(s) that are not in a class folder "
                         f"(first: {self.loose[0].relative_to(root)}): each image's folder names its class")
        return notes


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted, as ingest reads a class folder (no hidden files, no macOS metadata)."""
    return _Files().images(folder)


def _folder_records(root: Path, where: str) -> _Listing:
    """The images under ``root`` (``where`` names it in messages: the source the user gave)."""
    top = _subfolders(root)
    if not top:
        raise InputError(
            f"`{where}` has no class subfolders: put each class's images in its own subfolder "
            "(data/cat/*.jpg, data/dog/*.jpg) or give TFRecord shards."
        )
    if len(top) == 1 and len(inner := _subfolders(top[0])) > 1 and top[0].name.lower() not in SPLIT_FOLDERS:
        # data/flower_photos/<class>/ given as data: one class, the folder that holds the classes.
        raise InputError(
            f"dataset source `{where}` has 1 class folder, `{top[0].name}/`, which holds {len(inner)} folders "
            f"({', '.join(d.name for d in inner[:4])}{', ...' if len(inner) > 4 else ''}): if those are the classes, "
            f"give `{where.rstrip('/')}/{top[0].name}` as source; a classifier needs at least 2 classes."
        )
    files = _Files()
    files.look_beside(root)
    splits = [d for d in top if d.name.lower() in SPLIT_FOLDERS and _subfolders(d)]
    if not splits:
        records = []
        for label, class_dir in enumerate(top):
            records.extend((path, label) for path in files.images(class_dir))
        return _Listing([d.name for d in top], records, notes=files.notes(root))
    if others := [d.name for d in top if d not in splits]:
        raise InputError(
            f"`{where}` mixes split folders ({', '.join(d.name + '/' for d in splits)}) with other folders "
            f"({', '.join(o + '/' for o in others[:3])}): put every class's folder inside the split folders, "
            "or give one folder per class and let kftune split them."
        )
    by_split: dict[str, list[Path]] = {}
    for d in splits:
        by_split.setdefault(SPLIT_FOLDERS[d.name.lower()], []).append(d)
    if twice := [f"{' and '.join(d.name + '/' for d in ds)}" for ds in by_split.values() if len(ds) > 1]:
        raise InputError(f"`{where}` has two folders for one split ({'; '.join(twice)}): merge them into one.")
    if "train" not in by_split:
        raise InputError(
            f"`{where}` has split folders ({', '.join(d.name + '/' for d in splits)}) but no train/: the images to "
            "train on go in train/<class>/."
        )
    class_names = sorted({c.name for d in splits for c in _subfolders(d)})
    records, folders = [], []
    for split, (d,) in sorted(by_split.items(), key=lambda kv: SPLITS.index(kv[0])):
        files.look_beside(d)
        for class_dir in _subfolders(d):
            paths = files.images(class_dir)
            records.extend((path, class_names.index(class_dir.name)) for path in paths)
            folders.extend([split] * len(paths))
    given = ", ".join(f"{split} from {ds[0].name}/" for split, ds in by_split.items())
    carved = [s for s in SPLITS if s not in by_split]
    notes = [f"split folders kept as given: {given}"
             + (f"; {' and '.join(carved)} drawn from {by_split['train'][0].name}/ by class" if carved else "")]
    return _Listing(class_names, records, folders=folders, notes=notes + files.notes(root))


def _tfrecord_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".tfrecord" in p.name)


def _masked_crc(data: bytes) -> int:
    """The CRC32C, masked, that TFRecord framing stores after the length and after the data."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _shard_records(path: Path) -> Iterator[tuple[int, int, bytes | None]]:
    """(offset, length, data) of each record of a TFRecord shard, data None where its checksum fails.

    Read one record at a time, so that a shard of any size costs one record of
    memory. Framing damage (a truncated file, a bad length) loses the place of
    every later record, so it is an error; a record whose data alone is damaged
    is passed on as None, to be skipped and counted like an undecodable image.
    """
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return
            length, length_crc = struct.unpack("<QI", header) if len(header) == 12 else (0, None)
            if length_crc is None or _masked_crc(header[:8]) != length_crc:
                raise InputError(
                    f"TFRecord shard `{path}` is truncated or damaged at byte {f.tell() - len(header)}: "
                    "copy it again from its source, or remove it."
                )
            offset = f.tell()
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                raise InputError(
                    f"TFRecord shard `{path}` is truncated (its last record ends past the end of the file): "
                    "copy it again from its source, or remove it."
                )
            yield offset, length, data if struct.unpack("<I", footer)[0] == _masked_crc(data) else None


def _parse_example(data: bytes, where: str) -> tuple[bytes, int]:
    """(encoded image, label) of one serialized tf.train.Example."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.example import example_pb2

    need = "each example needs one encoded `image` (bytes feature) and one `label` (int64 feature, 0, 1, 2, ...)"
    try:
        features = example_pb2.Example.FromString(data).features.feature
    except DecodeError:
        raise InputError(f"{where} is not a tf.train.Example: {need}.") from None
    images = features["image"].bytes_list.value if "image" in features else []
    labels = features["label"].int64_list.value if "label" in features else []
    if len(images) != 1 or len(labels) != 1:
        found = {name: feature.WhichOneof("kind") for name, feature in sorted(features.items())}
        raise InputError(f"{where} has features {found}: {need}.")
    if labels[0] < 0:
        raise InputError(f"{where} has label {labels[0]}: labels count classes from 0 (the lines of labels.txt).")
    return images[0], int(labels[0])


@dataclasses.dataclass(frozen=True)
class _Record:
    """Where one example sits in a TFRecord shard: its image is read when it is decoded, not before."""

    path: Path
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return _parse_example(f.read(self.length), f"`{self.path}`")[0]


# TensorFlow Datasets names its shards `<dataset>-<split>.tfrecord-00000-of-00004`.
_TFDS_SHARD = re.compile(r"-([a-z][a-z_]*)\.tfrecord-\d+-of-\d+$")
# The class names of the shards' labels, one per line: kftune's name, then the file TensorFlow Datasets
# writes beside its shards for a ClassLabel feature named `label`.
LABELS_FILES = ("labels.txt", "label.labels.txt")


def _shard_split(relative: Path) -> str | None:
    """The split a shard's name or folder names (``train``, ``validation``, ``test``), else None.

    Anything else a TensorFlow Datasets shard names (``extra``, ``unlabeled``)
    comes back as it is, to be left out.
    """
    if match := _TFDS_SHARD.search(relative.name.lower()):
        return SPLIT_FOLDERS.get(match.group(1), match.group(1))
    found = {SPLIT_FOLDERS[token] for part in relative.parts for token in re.split(r"[-_.]", part.lower())
             if token in SPLIT_FOLDERS}
    return found.pop() if len(found) == 1 else None


def _shard_splits(root: Path, shards: list[Path], where: str) -> tuple[list[str] | None, list[str]]:
    """Each shard's split, when every shard's name gives one (else None), and the splits left out."""
    named = [_shard_split(path.relative_to(root)) for path in shards]
    if not any(named):
        return None, []
    if not all(named):
        unnamed = [str(path.relative_to(root)) for path, split in zip(shards, named, strict=True) if not split]
        raise InputError(
            f"`{where}` has TFRecord shards named by split and shards that are not ({', '.join(unnamed[:3])}): name "
            "each shard's split (train-00000.tfrecord, validation-00000.tfrecord), or none of them and kftune splits."
        )
    if "train" not in named:
        raise InputError(
            f"`{where}` has TFRecord shards of the splits {sorted(set(named))} but none of train: the examples to "
            "train on go in shards named train."
        )
    return named, sorted(set(named) - set(SPLITS))


def _tfrecord_records(root: Path, where: str) -> _Listing:
    """Class names, (record, label) pairs and the number of damaged records, reading labels only.

    Shards whose names give their split (``train-*.tfrecord``, TensorFlow
    Datasets' ``<name>-train.tfrecord-*``) keep it, as split folders do.
    """
    shards = _tfrecord_files(root)
    splits, others = _shard_splits(root, shards, where)
    records, damaged, folders = [], 0, []
    for number, path in enumerate(shards):
        if splits and splits[number] in others:
            continue
        for index, (offset, length, data) in enumerate(_shard_records(path)):
            if data is None:
                damaged += 1
                log.warning("skipping record %d of %s: its checksum does not match its data", index, path)
                continue
            _, label = _parse_example(data, f"record {index} of TFRecord shard `{path}`")
            records.append((_Record(path, offset, length), label))
            folders += [splits[number]] if splits else []
    num_classes = max((label for _, label in records), default=-1) + 1
    labels_file = next((root / name for name in LABELS_FILES if (root / name).exists()), None)
    if labels_file:
        names = [line.strip() for line in labels_file.read_text().splitlines() if line.strip()]
        if len(names) < num_classes:
            raise InputError(
                f"`{labels_file}` names {len(names)} classes but the shards use label {num_classes - 1}: "
                "add the missing class names."
            )
    else:
        names = [str(i) for i in range(num_classes)]
    notes = []
    if splits:
        kept = sorted(set(splits) - set(others), key=SPLITS.index)
        carved = [s for s in SPLITS if s not in kept]
        notes.append(f"split of the shards' names kept as given: {', '.join(kept)}"
                     + (f"; {' and '.join(carved)} drawn from train by class" if carved else ""))
    if others:
        notes.append(f"left out the shards of {', '.join(others)}: kftune trains, validates and tests on train, "
                     "validation and test")
    return _Listing(names, records, damaged, folders=folders or None, notes=notes)


# Archives a source may be, as datasets are downloaded (Keras' flower_photos.tgz, a Kaggle .zip).
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _unpack(archive: Path, source: str, workdir: Path) -> tuple[Path, str]:
    """Extracts a .zip or tar archive under ``workdir``: the folder that holds its data, and a line saying so.

    The data folder is the archive's single top folder where there is one
    (flower_photos.tgz holds flower_photos/), down as long as there is one.
    Neither format can write outside the folder: zipfile drops ``..`` and
    absolute paths, and tarfile's ``data`` filter refuses them, and links
    that point outside.
    """
    import tarfile
    import zipfile

    target = workdir / "unpacked"
    target.mkdir()
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(target)
        else:
            with tarfile.open(archive) as t:
                t.extractall(target, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise InputError(f"dataset source `{source}` is not an archive that can be read ({e}): download it again, "
                         "or give the folder it unpacks to.") from None
    root = target
    while len(entries := [p for p in root.iterdir() if not p.name.startswith(".") and p.name != MACOS_FOLDER]) == 1 \
            and entries[0].is_dir():
        root = entries[0]
    files = sum(1 for p in target.rglob("*") if p.is_file())
    inside = f"; its data in {root.relative_to(target)}/" if root != target else ""
    return root, f"unpacked {archive.name} ({files} files){inside}"


def _list_source(source: str, workdir: Path) -> _Listing:
    """What ``source`` holds: class names, (image or where to read it, label) pairs, damaged records.

    Images are listed, not read: ingest decodes them one at a time, so memory
    does not grow with the dataset.
    """
    if source == BUNDLED:
        return _Listing(*_bundled_digits())
    root = storage.fetch(source, workdir) if storage.is_gcs(source) else Path(source)
    if not root.exists():
        raise InputError(f"dataset source `{source}` does not exist: give a folder, a gs:// prefix or {BUNDLED}.")
    unpacked, where = [], source
    if root.is_file() and root.name.lower().endswith(ARCHIVE_SUFFIXES):
        root, line = _unpack(root, source, workdir)
        unpacked.append(line)
        where = f"{source}, unpacked" + (f", {root.name}/" if root.name != "unpacked" else "")
    if not root.is_dir():
        raise InputError(f"dataset source `{source}` is a file: give the folder that holds the class subfolders, or "
                         f"an archive of it ({', '.join(ARCHIVE_SUFFIXES)}).")
    listing = _tfrecord_records(root, where) if _tfrecord_files(root) else _folder_records(root, where)
    listing.notes[:0] = unpacked
    return listing


# ---------------------------------------------------------------- split


def split_indices(labels: list[int], config: IngestConfig, class_names: list[str],
                  folders: list[str] | None = None) -> dict[str, list[int]]:
    """Stratified, seeded split: every class is split with the same fractions.

    With ``folders`` (a split-folder layout: the split each image's folder
    names), an image in a validation or test folder stays in that split, and a
    split that has no folder is drawn from each class's images in the train
    folder with its fraction.
    """
    rng = np.random.default_rng(config.seed)
    given = sorted(set(folders or ()) - {"train"}, key=SPLITS.index)
    carve = [name for name in ("test", "validation") if name not in given]
    by_class: dict[int, list[int]] = {}
    fixed: dict[str, dict[int, list[int]]] = {name: {} for name in given}
    for index, label in enumerate(labels):
        folder = folders[index] if folders else "train"
        (by_class if folder == "train" else fixed[folder]).setdefault(label, []).append(index)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    # Every class that is too small, in one message: a user fixing one per run would need a run per class.
    need = 1 + len(carve)
    small = [f"`{name}` has {len(by_class.get(label, []))}" for label, name in enumerate(class_names)
             if len(by_class.get(label, [])) < need]
    if small and folders is None:
        raise InputError(
            f"{len(small)} class(es) have too few images: {'; '.join(small)}. Each class needs at least 3 "
            "(one each for train, validation and test): add images or remove the class."
        )
    if small:
        drawn = f", and one each drawn for {' and '.join(carve)}" if carve else ""
        raise InputError(
            f"{len(small)} class(es) have too few images in the train folder: {'; '.join(small)}. Each class needs "
            f"at least {need} there (one to train on{drawn}): add images or remove the class."
        )
    missing = [f"`{name}` (none in the {' or '.join(s for s in given if label not in fixed[s])} folder)"
               for label, name in enumerate(class_names) if any(label not in fixed[s] for s in given)]
    if missing:
        raise InputError(
            f"{len(missing)} class(es) have no images in a split folder: {'; '.join(missing)}. Every class needs "
            "images in each split folder: add them, or remove that split folder and kftune draws the split from train."
        )
    for label in range(len(class_names)):
        members = list(rng.permutation(by_class[label]))
        n_test = max(1, round(len(members) * config.test_fraction)) if "test" in carve else 0
        n_val = max(1, round(len(members) * config.validation_fraction)) if "validation" in carve else 0
        splits["test"] += members[:n_test]
        splits["validation"] += members[n_test : n_test + n_val]
        splits["train"] += members[n_test + n_val :]
        for name in given:
            splits[name] += fixed[name][label]
    return {name: [int(i) for i in rng.permutation(idx)] for name, idx in splits.items()}


# ---------------------------------------------------------------- write / read


def _to_image(item, config: IngestConfig):
    """Decodes (if bytes or a path) and resizes one image to uint8 HxWxC."""
    import tensorflow as tf

    if isinstance(item, Path):
        item = item.read_bytes()
    elif isinstance(item, _Record):
        item = item.read()
    if isinstance(item, bytes):
        image = tf.io.decode_image(item, channels=config.channels, expand_animations=False)
    else:
        image = tf.convert_to_tensor(item)
        if image.shape.rank == 2:
            image = image[..., None]
        if image.shape[-1] != config.channels:
            image = image[..., :1]
            image = tf.image.grayscale_to_rgb(image) if config.channels == 3 else image
    return to_size(image, config.image_size).numpy()


def to_size(image, image_size: int):
    """An HxWxC image as uint8 ``image_size`` x ``image_size``: the one resize every image a model sees goes through.

    Ingest calls it on each image before training; the exported model's serving
    signatures call it inside their graph (kftune.serving), so a photo sent to a
    server is resized exactly as the training images were. An image already at
    the size is only cast: resizing it would round its pixels once more.
    """
    import tensorflow as tf

    def resized():
        image_f = tf.image.resize(image, (image_size, image_size), method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(image_f), 0, 255), tf.uint8)

    shape = tf.shape(image)
    if isinstance(image, tf.Tensor) and not tf.executing_eagerly():
        same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
        return tf.cond(same, lambda: tf.cast(image, tf.uint8), resized)
    if tuple(int(d) for d in shape[:2]) == (image_size, image_size):
        return tf.cast(image, tf.uint8)
    return resized()


def _example(image: np.ndarray, label: int) -> bytes:
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    # deterministic: protobuf writes a map (the features) in an order drawn per
    # process unless told to sort it, and the dataset's fingerprint hashes these
    # bytes: the same images ingested by two processes must give the same shards.
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


class ShardWriter:
    """Writes (image, label) pairs of one split into numbered TFRecord shards."""

    def __init__(self, folder: str | Path, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = Path(folder), split, shard_size
        self.count = 0
        self._writer = None

    def write(self, image: np.ndarray, label: int) -> None:
        import tensorflow as tf

        if self.count % self.shard_size == 0:
            self.close()
            shard = self.count // self.shard_size
            self._writer = tf.io.TFRecordWriter(str(self.folder / f"{self.split}-{shard:05d}.tfrecord"))
        self._writer.write(_example(image, label))
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def fingerprint(folder: str | Path) -> str:
    """SHA-256 over the shards' bytes: two datasets with the same data agree."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.tfrecord")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# A largest class this many times the smallest: accuracy says little about the small classes.
IMBALANCE_RATIO = 10


def _imbalance(train_counts: list[int], class_names: list[str]) -> list[str]:
    """A line naming the smallest and largest classes when they are IMBALANCE_RATIO or more apart."""
    small = min(range(len(class_names)), key=lambda label: train_counts[label])
    large = max(range(len(class_names)), key=lambda label: train_counts[label])
    if not train_counts[small] or train_counts[large] < IMBALANCE_RATIO * train_counts[small]:
        return []
    return [f"the classes are imbalanced: `{class_names[small]}` has {train_counts[small]} training images, "
            f"`{class_names[large]}` {train_counts[large]} ({train_counts[large] / train_counts[small]:.0f}x): "
            "accuracy mostly measures the large classes; read the evaluation's per-class recall"]


def _refuse_emptied_classes(per_class: dict[str, list[int]], class_names: list[str], source: str) -> None:
    """Refuses a dataset in which skipping images left a class with no image in some split.

    Under ``max_corrupt_fraction`` overall, a class whose files are all bad would
    otherwise be published with zero images: a model that can never predict it.
    """
    empty = [f"`{name}` (none in {', '.join(s for s in SPLITS if per_class[s][label] == 0)})"
             for label, name in enumerate(class_names) if any(per_class[s][label] == 0 for s in SPLITS)]
    if empty:
        raise InputError(
            f"after skipping undecodable images (and copies of another split's images), {len(empty)} class(es) of "
            f"`{source}` have no image left in a split: {'; '.join(empty)}. Fix or replace those files, add images, "
            "or remove the class."
        )


def _refuse_too_few_for_folds(train_counts: list[int], class_names: list[str], folds: int) -> None:
    """Refuses a training split in which a class has fewer images than the search's folds.

    The search's stratified k-fold needs each class in every fold; found here, in
    ingest, the run stops before any search worker asks for a GPU.
    """
    if folds <= 1 or min(train_counts) >= folds:
        return
    smallest = min(range(len(class_names)), key=lambda label: train_counts[label])
    raise InputError(
        f"`folds`={folds} needs at least {folds} training images of every class, but class "
        f"`{class_names[smallest]}` has {train_counts[smallest]} in the training split: lower `folds` or add images."
    )


def _describe(item, index: int) -> str:
    """How a log line names one listed image: its file, its place in a shard, or its number."""
    if isinstance(item, Path):
        return str(item)
    if isinstance(item, _Record):
        return f"the record at byte {item.offset} of {item.path}"
    return f"image {index}"


class _Copies:
    """Finds images whose pixels, as written (resized), repeat an image written before.

    Scraped and merged datasets hold copies. A validation or test image that
    repeats a training image scores the model on what it trained on (a test image
    that repeats a validation image, on what picked it), so it is left out. The
    same pixels under two labels are named: one label is wrong.
    """

    def __init__(self):
        self._first: dict[bytes, tuple[int, int, int]] = {}  # pixels' digest -> (split, label, record index)
        self.left_out = dict.fromkeys(SPLITS, 0)
        self.example: tuple[int, int] | None = None
        self.conflicts: list[tuple[int, int]] = []

    def leave_out(self, image: np.ndarray, split: str, label: int, index: int) -> bool:
        key = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
        first = self._first.setdefault(key, (SPLITS.index(split), label, index))
        if first[2] == index:
            return False
        if first[1] != label:
            self.conflicts.append((first[2], index))
        if first[0] == SPLITS.index(split):
            return False  # a copy inside one split weighs that image twice; it leaks nothing
        self.left_out[split] += 1
        self.example = self.example or (first[2], index)
        return True

    def notes(self, records: list[tuple[object, int]], class_names: list[str]) -> list[str]:
        notes = []
        if self.example:
            first, copy = self.example
            counts = " and ".join(f"{n} {split}" for split, n in self.left_out.items() if n)
            notes.append(f"left out {counts} image(s) whose pixels repeat an image of an earlier split (first: "
                         f"{_describe(records[copy][0], copy)}, a copy of {_describe(records[first][0], first)}): "
                         "left in, they would score the model on images it has already seen")
        if self.conflicts:
            a, b = self.conflicts[0]
            notes.append(f"{len(self.conflicts)} image(s) repeat an image of another class (first: "
                         f"{_describe(records[a][0], a)} in `{class_names[records[a][1]]}` and "
                         f"{_describe(records[b][0], b)} in `{class_names[records[b][1]]}`): one of the labels "
                         "is wrong; fix or remove them")
        return notes


def ingest(config: IngestConfig, output_dir: str | Path, progress: Callable[[str], None] = log.info) -> DatasetInfo:
    """Reads ``config.source``, splits it, and writes a kftune dataset to ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        listing = _list_source(config.source, Path(workdir))
        class_names, records, skipped = listing.class_names, listing.records, listing.damaged
        if not records:
            raise InputError(
                f"dataset source `{config.source}` holds no images: put image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}) in one subfolder per class, or examples in TFRecord shards."
            )
        if len(class_names) < 2:
            raise InputError(f"dataset source `{config.source}` has {len(class_names)} class: a classifier needs at least 2.")
        splits = split_indices([label for _, label in records], config, class_names, listing.folders)
        # Before any image is decoded; checked again below on what was written (skipped images count out).
        train_counts = [0] * len(class_names)
        for index in splits["train"]:
            train_counts[records[index][1]] += 1
        _refuse_too_few_for_folds(train_counts, class_names, config.folds)
        progress(f"ingest: {len(records)} images, {len(class_names)} classes from {config.source}")
        for note in listing.notes:
            progress(f"ingest: {note}")
        total, bad = len(records) + skipped, []
        if skipped > config.max_corrupt_fraction * total:
            raise InputError(
                f"{skipped} of {total} records in the TFRecord shards of `{config.source}` are damaged (their "
                f"checksums fail), more than max_corrupt_fraction={config.max_corrupt_fraction}: copy the shards "
                "again from their source."
            )
        counts, per_class, copies = {}, {split: [0] * len(class_names) for split in SPLITS}, _Copies()
        for split in SPLITS:
            writer = ShardWriter(output_dir, split, config.shard_size)
            for index in splits[split]:
                item, label = records[index]
                try:
                    image = _to_image(item, config)
                except Exception as e:  # noqa: BLE001 - any undecodable file is skipped and counted
                    skipped += 1
                    name = _describe(item, index)
                    bad.append(name)
                    reason = re.sub(r"\{\{.*?\}\}\s*", "", getattr(e, "message", str(e))).splitlines()[0]
                    log.warning("skipping %s: %s", name, reason)
                    # Fail as soon as the share is out of bounds, not after decoding the rest.
                    if skipped > config.max_corrupt_fraction * total:
                        writer.close()
                        raise InputError(
                            f"at least {skipped} of {total} images in `{config.source}` could not be decoded "
                            f"(first: {', '.join(bad[:3])}), more than max_corrupt_fraction="
                            f"{config.max_corrupt_fraction}: fix or remove the bad files, or raise max_corrupt_fraction."
                        ) from None
                    continue
                if copies.leave_out(image, split, label, index):
                    continue
                writer.write(image, label)
                per_class[split][label] += 1
            writer.close()
            counts[split] = writer.count
            progress(f"ingest: wrote {writer.count} {split} images")
        notes = listing.notes + copies.notes(records, class_names) + _imbalance(per_class["train"], class_names)
        for note in notes[len(listing.notes):]:
            progress(f"ingest: {note}")
        _refuse_emptied_classes(per_class, class_names, config.source)
        _refuse_too_few_for_folds(per_class["train"], class_names, config.folds)
    if skipped:
        progress(f"ingest: skipped {skipped} undecodable image(s) of {total}")
    info = DatasetInfo(
        class_names=class_names,
        image_size=config.image_size,
        channels=config.channels,
        splits=counts,
        source=config.source,
        seed=config.seed,
        fingerprint=fingerprint(output_dir),
        skipped=skipped,
        notes=notes,
    )
    info.save(output_dir)
    return info


def load_split(folder: str | Path, split: str):
    """The examples of one split as a ``tf.data.Dataset`` of (uint8 image, int64 label)."""
    import tensorflow as tf

    info = DatasetInfo.load(folder)
    if split not in info.splits:
        raise InputError(f"dataset `{folder}` has no `{split}` split; it has {sorted(info.splits)}.")
    files = sorted(str(p) for p in Path(folder).glob(f"{split}-*.tfrecord"))
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }

    def parse(raw):
        example = tf.io.parse_single_example(raw, spec)
        image = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), info.shape)
        return image, example["label"]

    return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE)


# Training reads its data once an epoch. Data whose images take at most this many bytes is kept in
# memory after the first epoch (tf.data's cache), so that later epochs do not read and parse the
# shards again: a 3-fold search trial on the digits took half the time. 512 MiB is about 3,400
# photos at 224 px, well inside the 8 GiB the shipped profiles give fine-tune and prune; more data
# streams from the shards every epoch, and memory does not grow with it.
EPOCH_CACHE_BYTES = 512 * 2**20


def for_epochs(data, info: DatasetInfo, images: int):
    """``data`` (``images`` examples of ``info``'s dataset) as training reads it every epoch.

    In memory after the first epoch when the images fit EPOCH_CACHE_BYTES, else
    streamed each time; the examples and their order are the same either way.
    """
    return data.cache() if images * int(np.prod(info.shape)) <= EPOCH_CACHE_BYTES else data


def epoch_split(folder: str | Path, split: str):
    """One whole split as training reads it every epoch (:func:`for_epochs` over :func:`load_split`)."""
    info = DatasetInfo.load(folder)
    return for_epochs(load_split(folder, split), info, info.splits[split])


def load_labels(folder: str | Path, split: str) -> np.ndarray:
    """The labels of one split, in order, without decoding or keeping any image."""
    import tensorflow as tf

    info = DatasetInfo.load(folder)
    if split not in info.splits:
        raise InputError(f"dataset `{folder}` has no `{split}` split; it has {sorted(info.splits)}.")
    files = sorted(str(p) for p in Path(folder).glob(f"{split}-*.tfrecord"))
    spec = {"label": tf.io.FixedLenFeature([], tf.int64)}
    labels = tf.data.TFRecordDataset(files).map(lambda raw: tf.io.parse_single_example(raw, spec)["label"])
    chunks = list(labels.batch(4096).as_numpy_iterator())
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.int64)


def load_arrays(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split as numpy arrays (uint8 images, int labels): for small evaluation sets."""
    images, labels = [], []
    for image, label in load_split(folder, split).batch(1024).as_numpy_iterator():
        images.append(image)
        labels.append(label)
    info = DatasetInfo.load(folder)
    if not images:
        return np.zeros((0, *info.shape), np.uint8), np.zeros((0,), np.int64)
    return np.concatenate(images), np.concatenate(labels)


# Evaluation batches hold at most this many bytes of (uint8) images: 256 images at 32x32 RGB are
# 0.8 MB, while at 224x224 RGB the budget allows 27, so that the float copy and a backbone's
# activations for one batch stay in the hundreds of MB instead of growing to several GB.
EVAL_BATCH_BYTES = 4 * 2**20
# Images per evaluation batch where EVAL_BATCH_BYTES allows: it changes no number, only memory.
EVAL_BATCH = 256


def eval_batch_size(image_shape, largest: int = EVAL_BATCH) -> int:
    """Images per evaluation batch for images of ``image_shape``: at most ``largest``, within EVAL_BATCH_BYTES."""
    return int(max(1, min(largest, EVAL_BATCH_BYTES // max(int(np.prod(image_shape)), 1))))


def batches(data, batch_size: int = EVAL_BATCH):
    """Batches a (image, label) ``tf.data.Dataset`` for evaluation, unshuffled and never augmented.

    ``batch_size`` (EVAL_BATCH unless a test needs small batches) is cut to fit EVAL_BATCH_BYTES
    (it changes no score, only memory).
    Training data goes through :func:`kftune.augment.training_batches` instead.
    """
    import tensorflow as tf

    return data.batch(eval_batch_size(data.element_spec[0].shape, batch_size)).prefetch(tf.data.AUTOTUNE)
