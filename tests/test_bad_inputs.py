"""The bad-input matrix: every component, given bad input, stops with one clear line and the right exit code.

Each row drives one bad input through a real component function
(``components.<module>.<component>.python_func``, with KFP artifact objects
whose paths point into the test's folder) or, for pipeline parameters, through
``kftune run-local``'s entry point. The component boundary
(``kftune.errors.user_errors``) turns kftune's own errors into exactly one
``kftune: ...`` line on stderr and exit code 2 (the user's mistake) or 3
(storage). A row fails when the input meets any other exception (a traceback
from deep inside TensorFlow), a second line, a line that does not name the
input, or, where a row says so, when work was done or something stored was lost.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model

from components import augment as c_augment
from components import evaluate as c_evaluate
from components import export as c_export
from components import finetune as c_finetune
from components import ingest as c_ingest
from components import prune as c_prune
from components import search as c_search
from components import validate as c_validate
from kftune import augment as augment_core
from kftune import dataset, models, parameters, storage
from kftune import evaluate as ev
from kftune import export as export_core
from kftune import finetune as finetune_core
from kftune import prune as prune_core
from kftune import search as search_core

# ---------------------------------------------------------------- real bad data, built in code


def _png(rng, shape) -> bytes:
    import tensorflow as tf

    return tf.io.encode_png(rng.integers(0, 255, shape, dtype=np.uint8)).numpy()


def _class_folders(root: Path, counts: dict[str, int], size=(10, 10)) -> Path:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(_png(rng, (*size, 3)))
    return root


def _tfrecords(root: Path, features: list[dict], labels_txt: str | None = None) -> Path:
    """One shard of tf.train.Examples; ``features`` maps names to bytes (bytes_list) or ints (int64_list)."""
    import tensorflow as tf

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    root.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(root / "data-00000.tfrecord")) as writer:
        for example in features:
            writer.write(tf.train.Example(features=tf.train.Features(
                feature={k: feature(v) for k, v in example.items()})).SerializeToString())
    if labels_txt is not None:
        (root / "labels.txt").write_text(labels_txt)
    return root


def _examples(count: int, classes: int = 2, **override) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"image": _png(rng, (9, 9, 1)), "label": i % classes, **override} for i in range(count)]


def _truncate(path: Path) -> None:
    """Cuts a file off part-way, as an interrupted copy does.

    Off the middle by a few bytes: the records of a shard here are all the same
    size, and a shard cut exactly between two records is a valid, shorter shard
    (the format has no end marker).
    """
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 7])


# ---------------------------------------------------------------- the context each row builds its input in


class Ctx:
    """What a row can use: its own folder, the shared datasets and model, a GCS emulator bucket."""

    def __init__(self, request, tmp_path: Path, monkeypatch):
        self.request, self.tmp, self.monkeypatch = request, tmp_path, monkeypatch
        self.out = tmp_path / "out"
        self.out.mkdir()  # KFP creates the folder output artifacts go in

    def fixture(self, name):
        return self.request.getfixturevalue(name)

    @functools.cached_property
    def bucket(self) -> str:
        return self.fixture("bucket")

    def deny_all(self) -> None:
        """From here on every GCS request is refused with 403, as for a service account without a role."""
        from faultproxy import FaultProxy

        self.bucket  # noqa: B018 - the bucket exists; only access to it is denied
        proxy = FaultProxy(self.fixture("gcs_emulator"), {"api": ["403"], "upload": ["403"], "download": ["403"]})
        self.request.addfinalizer(proxy.close)
        self.request.addfinalizer(storage._client.cache_clear)
        self.monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        storage._client.cache_clear()

    def put(self, name: str, data: bytes) -> str:
        """Uploads an object to the bucket; returns its gs:// URI."""
        storage._client().bucket(self.bucket).blob(name).upload_from_string(data)
        return f"gs://{self.bucket}/{name}"


# ---------------------------------------------------------------- component calls


def _config(cls, **fields) -> str:
    """A step's config JSON as the validation step writes it, with ``fields`` put in unchecked,
    so that the step itself meets them (a config written by hand or by another kftune version)."""
    return json.dumps({**dataclasses.asdict(cls()), **fields})


def validate(ctx: Ctx, **over):
    """The validation step with the pipeline's defaults and ``over``: what the run form sends."""
    return c_validate.validate.python_func, dict(
        **{**parameters.defaults(), "image_size": 8, **over}, pipeline_root=str(ctx.tmp / "root"), run_id="run",
        search_config=Artifact(uri=str(ctx.out / "search_config")), settings=Markdown(uri=str(ctx.out / "settings.md")))


def ingest(ctx: Ctx, **over):
    return c_ingest.ingest.python_func, dict(dataset=Dataset(uri=str(ctx.out / "dataset")),
                                             summary=Markdown(uri=str(ctx.out / "summary.md")),
                                             config=_config(dataset.IngestConfig, **{"image_size": 8, **over}))


def augment(ctx: Ctx, data: Dataset | None = None, **over):
    return c_augment.augment.python_func, dict(
        dataset=data or Dataset(uri=str(ctx.fixture("digits_dir"))), augmented=Dataset(uri=str(ctx.out / "augmented")),
        preview=HTML(uri=str(ctx.out / "preview.html")),
        config=_config(augment_core.AugmentConfig, **{"augment_spec": "{rotation_range: 10}", **over}))


SPACE = "{learning_rate: {type: choice, values: [0.001, 0.003]}}"


def search_worker(ctx: Ctx, data: str | None = None, **over):
    """A search worker whose settings carry ``over``."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    settings = ctx.out / "search_config"
    settings.write_text(_config(search_core.SearchConfig, search_space=SPACE, max_trials=1, parallel_trials=1,
                                trial_epochs=1, search_state_uri=str(ctx.tmp / "state"), **over))
    return c_search.search_worker.python_func, dict(dataset=Dataset(uri=data or str(ctx.fixture("digits_dir"))),
                                                    search_config=Artifact(uri=str(settings)), worker="0")


def finetune(ctx: Ctx, data: str | None = None, baseline: str | None = None, **over):
    fields = dict(finetune_epochs=1, unfreeze_epochs=1, unfreeze_layers=2, unfreeze_steps=1, patience=2,
                  checkpoint_uri=str(ctx.out / "checkpoints"))
    return c_finetune.finetune.python_func, dict(
        dataset=Dataset(uri=data or str(ctx.fixture("digits_dir"))),
        baseline=Model(uri=baseline or str(ctx.fixture("trained_model_dir"))),
        model=Model(uri=str(ctx.out / "model")), metrics=Metrics(uri=str(ctx.out / "metrics")),
        curves=HTML(uri=str(ctx.out / "curves.html")), tensorboard=Artifact(uri=str(ctx.out / "tensorboard")),
        config=_config(finetune_core.FinetuneConfig, **{**fields, **over}))


def prune(ctx: Ctx, data: str | None = None, model: str | None = None, **over):
    fields = dict(prune_epochs=1, prune_learning_rate=1e-3, prune_quantize="", prune_sparsity_levels="0.5,0.8")
    return c_prune.prune.python_func, dict(
        dataset=Dataset(uri=data or str(ctx.fixture("digits_dir"))),
        model=Model(uri=model or str(ctx.fixture("trained_model_dir"))), pruned=Model(uri=str(ctx.out / "pruned")),
        metrics=Metrics(uri=str(ctx.out / "metrics")), report_html=HTML(uri=str(ctx.out / "report.html")),
        config=_config(prune_core.PruneConfig, **{**fields, **over}))


def evaluate(ctx: Ctx, data: str | None = None, model: str | None = None, tflite_file: str = "", **gate):
    """The evaluate step with ``model`` as every candidate (its ``tflite_file`` copied in as the int8 one)."""
    folder = str(ctx.fixture("trained_model_dir")) if tflite_file or not model else model
    pruned = folder
    if tflite_file:
        copy = ctx.tmp / "pruned-with-tflite"
        shutil.copytree(folder, copy)
        shutil.copy(Path(model, tflite_file), copy / ev.QUANTIZED_FILE)
        pruned = str(copy)
    return c_evaluate.evaluate.python_func, dict(
        dataset=Dataset(uri=data or str(ctx.fixture("digits_dir"))), baseline=Model(uri=folder),
        finetuned=Model(uri=folder), pruned=Model(uri=pruned), gate_config=_config(ev.GateConfig, **gate),
        chosen=Model(uri=str(ctx.out / "chosen")), report_html=HTML(uri=str(ctx.out / "report.html")),
        metrics=Metrics(uri=str(ctx.out / "metrics")), confusion=ClassificationMetrics(uri=str(ctx.out / "confusion")),
        per_class=Markdown(uri=str(ctx.out / "per_class.md")), evaluations=Artifact(uri=str(ctx.out / "evaluations")))


def export(ctx: Ctx, model: str | None = None, **over):
    fields = {"export_destination": str(ctx.tmp / "exports"), "export_version": "1", **over}
    measured = ctx.out / "evaluations"
    measured.parent.mkdir(parents=True, exist_ok=True)
    measured.write_text("[]")
    return c_export.export.python_func, dict(model=Model(uri=model or str(ctx.fixture("trained_model_dir"))),
                                             dataset=Dataset(uri=str(ctx.fixture("digits_dir"))), run_name="run",
                                             evaluations=Artifact(uri=str(measured)),
                                             model_card=Markdown(uri=str(ctx.out / "model_card.md")),
                                             config=_config(export_core.ExportConfig, **fields))


def run_local(ctx: Ctx, *parameters: str):
    """``kftune run-local name=value ...``: the CLI checks every parameter before anything runs."""
    from pipelines import cli

    def main():
        raise SystemExit(cli.main(["run-local", *parameters, "--pipeline-root", str(ctx.out / "runs")]))

    return main, {}


def serve(ctx: Ctx, uri: str, *flags: str):
    """``kftune serve URI``: a version it cannot load, or a flag it cannot use, ends it before anything listens."""
    from conftest import _free_port

    from pipelines import cli

    def main():
        raise SystemExit(cli.main(["serve", uri, "--host", "127.0.0.1", "--port", str(_free_port()), *flags]))

    return main, {}


def serve_request(ctx: Ctx, images: list[bytes], keys: tuple[str, ...] = ()):
    """One request's images as `kftune serve` answers them (kftune.serving.Servable.predict, whose one line the
    server sends back in a 400: tests/test_server.py sends each of these over HTTP), at the component boundary."""
    from kftune.errors import user_errors

    servable = ctx.fixture("served_version")

    def predict():
        with user_errors():
            servable.predict(images, keys)

    return predict, {}


def _jpeg() -> bytes:
    import tensorflow as tf

    return tf.io.encode_jpeg(np.full((16, 16, 3), 200, np.uint8)).numpy()


def _png_declaring(width: int, height: int) -> bytes:
    """A real PNG whose header is rewritten to declare another canvas (a decompression bomb's trick)."""
    import struct

    data = bytearray(_png(np.random.default_rng(0), (4, 4, 3)))
    data[16:24] = struct.pack(">II", width, height)
    return bytes(data)


# ---------------------------------------------------------------- inputs that are wrong in more than one place


def _file(ctx: Ctx, name: str, data: bytes) -> str:
    path = ctx.tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _empty_folder(ctx: Ctx) -> str:
    (ctx.tmp / "empty").mkdir()
    return str(ctx.tmp / "empty")


def _missing_bucket(ctx: Ctx) -> str:
    """A bucket the emulator does not have (the emulator is started, so no real GCS is asked)."""
    ctx.fixture("gcs_emulator")
    return f"gs://{MISSING}"


def _not_a_model(ctx: Ctx) -> str:
    folder = ctx.tmp / "not-a-model"
    folder.mkdir()
    (folder / models.MODEL_FILE).write_text("a text file where a model should be")
    return str(folder)


def _lambda_model(ctx: Ctx) -> str:
    """A model whose Lambda layer would run code on load: an untrusted artifact."""
    k = models.keras()
    inputs = k.Input((16, 16, 3), name="image")
    outputs = k.layers.Dense(10, activation="softmax")(k.layers.Flatten()(k.layers.Lambda(lambda t: t * 2)(inputs)))
    folder = ctx.tmp / "lambda-model"
    folder.mkdir()
    k.Model(inputs, outputs).save(folder / models.MODEL_FILE)
    return str(folder)


def _corrupt_images(ctx: Ctx) -> str:
    root = _class_folders(ctx.tmp / "src", {"cat": 8, "dog": 8})
    for i in range(3):
        (root / "cat" / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return str(root)


def _undecodable_class(ctx: Ctx) -> str:
    """A class all of whose files are broken, under max_corrupt_fraction=0.2 overall (3 of 35)."""
    root = _class_folders(ctx.tmp / "src", {"cat": 16, "dog": 16})
    (root / "zebra").mkdir()
    for i in range(3):
        (root / "zebra" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return str(root)


def _truncated_images(ctx: Ctx) -> str:
    root = _class_folders(ctx.tmp / "src", {"cat": 8, "dog": 8})
    for i in range(3):
        _truncate(root / "dog" / f"{i}.png")
    return str(root)


def _truncated_shard(ctx: Ctx) -> str:
    root = _tfrecords(ctx.tmp / "src", _examples(30))
    _truncate(root / "data-00000.tfrecord")
    return str(root)


def _existing_version(ctx: Ctx) -> Path:
    version = ctx.tmp / "exports" / "1"
    version.mkdir(parents=True)
    (version / "model.keras").write_text("someone's earlier export")
    return version


def _no_model_written(ctx: Ctx) -> None:
    assert not list(ctx.out.rglob(models.MODEL_FILE)), "a model was trained and written"


def _no_dataset_written(ctx: Ctx) -> None:
    assert not (ctx.out / "dataset" / dataset.INFO_FILE).exists(), "a dataset was published as complete"


def _no_plan_written(ctx: Ctx) -> None:
    assert not (ctx.out / "plan").exists(), "the plan was written"


def _random_search_state(ctx: Ctx) -> None:
    """A search state that a random search started (a first trial handed out) at the row's search_state_uri."""
    config = search_core.SearchConfig(search_algorithm="random", search_space=SPACE, max_trials=2,
                                      search_state_uri=str(ctx.tmp / "state"))
    with search_core.oracle_turn(ctx.tmp / "state") as state:
        search_core.ask(config, state, "worker0")


def _no_fold_trained(ctx: Ctx) -> None:
    assert not list((ctx.tmp / "state").rglob("*.epochs.json")), "a fold trained"


def _existing_version_unchanged(ctx: Ctx) -> None:
    assert (ctx.tmp / "exports" / "1" / "model.keras").read_text() == "someone's earlier export"


def _nothing_exported(ctx: Ctx) -> None:
    assert not (ctx.tmp / "exports").exists(), "something was exported"


# ---------------------------------------------------------------- the matrix


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], tuple[Callable, dict]]
    message: str  # a regular expression the one line must match; it names the input
    code: int = 2
    after: Callable[[Ctx], None] | None = None  # checks that no work was done and nothing stored was lost


MISSING = f"kftune-missing-{uuid.uuid4().hex[:8]}"

CASES = [
    # ingest: the dataset itself
    Case("ingest/source-missing", lambda c: ingest(c, source=str(c.tmp / "nope")),
         r"dataset source `.*nope` does not exist"),
    Case("ingest/source-is-a-file", lambda c: ingest(c, source=_file(c, "0.png", b"png")),
         r"dataset source `.*0\.png` is a file"),
    Case("ingest/no-class-folders", lambda c: ingest(c, source=_empty_folder(c)), r"`.*empty` has no class subfolders"),
    Case("ingest/empty-dataset", lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {"a": 0, "b": 0}))),
         r"dataset source `.*d` holds no images"),
    Case("ingest/one-class", lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {"only": 6}))),
         r"dataset source `.*d` has 1 class: a classifier needs at least 2"),
    Case("ingest/the-folder-above-the-class-folders",
         lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {"flower_photos/daisy": 4, "flower_photos/roses": 4}))),
         r"dataset source `.*d` has 1 class folder, `flower_photos/`, which holds 2 folders \(daisy, roses\): if "
         r"those are the classes, give `.*d/flower_photos` as source"),
    Case("ingest/class-with-one-image", lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {"solo": 1, "b": 6}))),
         r"1 class\(es\) have too few images: `solo` has 1. Each class needs at least 3"),
    Case("ingest/two-classes-too-small-named-at-once",
         lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {"solo": 1, "pair": 2, "b": 6}))),
         r"2 class\(es\) have too few images: `pair` has 2; `solo` has 1"),
    # Keras' split layout, data/train/<class>/ + data/validation/<class>/, when it cannot be kept as given.
    Case("ingest/split-folders-mixed-with-class-folders",
         lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {"train/cats": 5, "train/dogs": 5, "cats": 5}))),
         r"`.*d` mixes split folders \(train/\) with other folders \(cats/\): put every class's folder inside",
         after=_no_dataset_written),
    Case("ingest/two-folders-for-one-split", lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {
        "train/a": 5, "train/b": 5, "val/a": 2, "val/b": 2, "validation/a": 2, "validation/b": 2}))),
         r"two folders for one split \(val/ and validation/\): merge them into one"),
    Case("ingest/split-folders-without-train", lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {
        "validation/a": 3, "validation/b": 3, "test/a": 3, "test/b": 3}))),
         r"has split folders \(test/, validation/\) but no train/"),
    Case("ingest/a-class-missing-from-the-validation-folder", lambda c: ingest(c, source=str(_class_folders(
        c.tmp / "d", {"train/a": 5, "train/b": 5, "validation/a": 2}))),
         r"1 class\(es\) have no images in a split folder: `b` \(none in the validation folder\)",
         after=_no_dataset_written),
    Case("ingest/too-few-in-the-train-folder-to-draw-test", lambda c: ingest(c, source=str(_class_folders(
        c.tmp / "d", {"train/a": 5, "train/b": 1, "validation/a": 2, "validation/b": 2}))),
         r"`b` has 1. Each class needs at least 2 there \(one to train on, and one each drawn for test\)"),
    Case("ingest/a-class-whose-images-are-all-undecodable", lambda c: ingest(c, source=_undecodable_class(c),
                                                                             max_corrupt_fraction=0.2),
         r"1 class\(es\) of `.*` have no image left in a split: `zebra` \(none in train, validation, test\)"),
    Case("ingest/corrupt-images-over-threshold", lambda c: ingest(c, source=_corrupt_images(c)),
         r"images in `.*src` could not be decoded \(first: .*broken.*\), more than max_corrupt_fraction=0.05",
         after=_no_dataset_written),
    Case("ingest/truncated-images-over-threshold", lambda c: ingest(c, source=_truncated_images(c)),
         r"images in `.*src` could not be decoded \(first: .*dog/.*\.png.*\), more than max_corrupt_fraction",
         after=_no_dataset_written),
    Case("ingest/tfrecord-without-label", lambda c: ingest(c, source=str(_tfrecords(c.tmp / "src", [
        {"image": e["image"]} for e in _examples(6)]))),
         r"record 0 of TFRecord shard `.*data-00000\.tfrecord` has features \{'image': 'bytes_list'\}: each "
         r"example needs one encoded `image` \(bytes feature\) and one `label` \(int64"),
    Case("ingest/tfrecord-label-of-wrong-type", lambda c: ingest(c, source=str(_tfrecords(c.tmp / "src", _examples(6, label=b"cat")))),
         r"TFRecord shard `.*` has features \{'image': 'bytes_list', 'label': 'bytes_list'\}"),
    Case("ingest/tfrecord-negative-label", lambda c: ingest(c, source=str(_tfrecords(c.tmp / "src", _examples(6, label=-1)))),
         r"TFRecord shard `.*data-00000\.tfrecord` has label -1: labels count classes from 0"),
    Case("ingest/tfrecord-truncated-shard", lambda c: ingest(c, source=_truncated_shard(c)),
         r"TFRecord shard `.*data-00000\.tfrecord` is truncated.*copy it again"),
    Case("ingest/labels-txt-names-too-few-classes", lambda c: ingest(c, source=str(_tfrecords(c.tmp / "src", _examples(9, classes=3), "a\nb\n"))),
         r"`.*labels\.txt` names 2 classes but the shards use label 2"),
    Case("ingest/more-folds-than-training-images-per-class",
         lambda c: ingest(c, source=str(_class_folders(c.tmp / "d", {"cat": 6, "dog": 12})), folds=6),
         r"`folds`=6 needs at least 6 training images of every class, but class `cat` has [0-5] in the training split",
         after=_no_dataset_written),
    Case("ingest/image-size-of-wrong-type", lambda c: ingest(c, image_size="32"),
         r"`image_size` must be a whole number. Received: image_size='32'"),
    Case("ingest/channels-2", lambda c: ingest(c, channels=2), r"`channels` must be 1 or 3"),
    Case("ingest/no-room-for-training", lambda c: ingest(c, validation_fraction=0.6, test_fraction=0.35),
         r"`validation_fraction` \+ `test_fraction` must leave at least 10% for training"),
    Case("ingest/corrupt-threshold-out-of-range", lambda c: ingest(c, max_corrupt_fraction=1.5),
         r"`max_corrupt_fraction` must be in \[0, 1\)"),
    Case("ingest/gs-bucket-missing", lambda c: ingest(c, source=f"{_missing_bucket(c)}/data"),
         rf"GCS bucket `{MISSING}` does not exist: create it", code=3),
    Case("ingest/gs-prefix-empty", lambda c: ingest(c, source=f"gs://{c.bucket}/nothing-here"),
         r"`gs://kftune-test-\w+/nothing-here` holds no objects"),
    Case("ingest/gs-access-denied", lambda c: (c.deny_all(), ingest(c, source=f"gs://{c.bucket}/data"))[1],
         r"access to `gs://kftune-test-\w+` was denied: give the pipeline's service account", code=3),
    # augment
    Case("augment/malformed-yaml", lambda c: augment(c, augment_spec="{rotation_range: [40"), r"augment spec is not valid YAML"),
    Case("augment/value-of-wrong-type", lambda c: augment(c, augment_spec="{rotation_range: forty}"),
         r"augment `rotation_range` must be a number"),
    Case("augment/negative-copies", lambda c: augment(c, augment_copies=-1), r"`augment_copies` must be a whole number >= 0"),
    Case("augment/dataset-not-ingested", lambda c: augment(c, data=Dataset(uri=str(c.tmp))),
         r"`.*` is not a kftune dataset \(no info\.json\): run the ingest step first"),
    # search
    Case("search/malformed-yaml", lambda c: validate(c, search_space="{lr: {type: float, min: 0.1"),
         r"search space is not valid YAML \(line 1, column \d+: .*\): write a mapping such as"),
    Case("search/value-of-wrong-type", lambda c: validate(c, search_space="{lr: {type: float, min: low, max: 0.1}}"),
         r"search space `lr`: `min` must be a number"),
    Case("search/unknown-algorithm", lambda c: validate(c, search_algorithm="genetic"), r"`search_algorithm` must be one of"),
    Case("search/max-trials-of-wrong-type", lambda c: validate(c, max_trials="3"),
         r"`max_trials` must be a whole number. Received: max_trials='3'"),
    Case("search/negative-epochs", lambda c: validate(c, trial_epochs=-1), r"`trial_epochs` must be a whole number >= 1"),
    Case("search/model-not-importable", lambda c: validate(c, model="no_such_module:build"),
         r"model `no_such_module:build`: module `no_such_module` cannot be imported"),
    Case("search/grid-float-without-step", lambda c: validate(c, search_algorithm="grid", search_space="{lr: {type: float, min: 0.001, max: 0.1}}"),
         r"search space `lr`: grid search needs a `step`"),
    Case("search/state-bucket-missing", lambda c: validate(c, search_state_uri=f"{_missing_bucket(c)}/state"),
         rf"GCS bucket `{MISSING}` does not exist", code=3, after=_no_plan_written),
    Case("search/trial-on-a-folder-that-is-no-dataset", lambda c: search_worker(c, data=str(c.tmp)),
         r"`.*` is not a kftune dataset \(no info\.json\)"),
    Case("search/space-optuna-cannot-take", lambda c: validate(c, search_algorithm="tpe",
         search_space="{lr: {type: float, min: 0.001, max: 0.1, sampling: reverse_log}}"),
         r"search space `lr`: Optuna \(search_algorithm=tpe or asha\) has no reverse_log sampling"),
    Case("search/median-stopping-with-asha", lambda c: validate(c, search_algorithm="asha", early_stopping="median"),
         r"`early_stopping`=median with search_algorithm=asha: asha stops trials itself"),
    Case("search/state-written-by-another-algorithm",
         lambda c: (_random_search_state(c), search_worker(c, search_algorithm="tpe"))[1],
         r"holds a search run with search_algorithm=random, which search_algorithm=tpe cannot continue: set "
         r"search_algorithm=random to resume it, or give a new search_state_uri", after=_no_fold_trained),
    Case("search/more-folds-than-images-per-class", lambda c: search_worker(c, folds=200),
         r"`folds`=200 needs at least 200 training images of every class, but class `\d` has \d+",
         after=_no_fold_trained),
    # fine-tune
    Case("finetune/negative-epochs", lambda c: finetune(c, finetune_epochs=-1), r"`finetune_epochs` must be a whole number >= 1"),
    Case("finetune/unknown-backbone", lambda c: finetune(c, backbone="inception"), r"`backbone` must be empty .* or one of"),
    Case("finetune/learning-rate-of-wrong-type", lambda c: finetune(c, finetune_learning_rate="fast"),
         r"`finetune_learning_rate` must be a number. Received: finetune_learning_rate='fast'"),
    Case("finetune/weights-file-that-is-no-weights",
         lambda c: finetune(c, backbone="mobilenet_v2_035", weights=_file(c, "w.h5", b"not weights")),
         r"weights file `.*w\.h5` does not fit MobileNetV2\(include_top=False\)", after=_no_model_written),
    Case("finetune/weights-object-missing", lambda c: finetune(c, backbone="mobilenet_v2_035", weights=f"gs://{c.bucket}/weights/none.h5"),
         r"`gs://kftune-test-\w+/weights/none\.h5` holds no objects", after=_no_model_written),
    Case("finetune/baseline-that-is-no-model", lambda c: finetune(c, baseline=_not_a_model(c)),
         r"`.*not-a-model/model\.keras` is not a loadable Keras model .*: pass the Model folder a kftune step wrote"),
    Case("finetune/labels-other-than-the-model's-classes", lambda c: finetune(c, data=str(c.fixture("three_class_dir"))),
         r"model `.*` was trained on classes \['0', .*'9'\] but the dataset has \['x', 'y', 'z'\]",
         after=_no_model_written),
    Case("finetune/images-of-another-shape", lambda c: finetune(c, data=str(c.fixture("digits8_dir"))),
         r"model `.*` takes images of shape \(16, 16, 3\) but the dataset holds \(8, 8, 3\)", after=_no_model_written),
    # prune
    Case("prune/sparsity-1.0", lambda c: prune(c, target_sparsity=1.0), r"`target_sparsity` must be in \[0, 1\)"),
    Case("prune/sparsity-of-wrong-type", lambda c: prune(c, target_sparsity="half"),
         r"`target_sparsity` must be a number. Received: target_sparsity='half'"),
    Case("prune/negative-epochs", lambda c: prune(c, prune_epochs=-2), r"`prune_epochs` must be a whole number >= 1"),
    Case("prune/unknown-quantization", lambda c: prune(c, prune_quantize="fp16"), r"`prune_quantize` takes a comma-separated subset"),
    Case("prune/labels-other-than-the-model's-classes", lambda c: prune(c, data=str(c.fixture("three_class_dir"))),
         r"model `.*` was trained on classes .* but the dataset has \['x', 'y', 'z'\]", after=_no_model_written),
    Case("prune/model-with-code-in-a-lambda-layer", lambda c: prune(c, model=_lambda_model(c)),
         r"`.*lambda-model/model\.keras` is not a loadable Keras model", after=_no_model_written),
    # the validation step: what the Kubeflow run form sends, checked before any GPU step
    Case("validate/source-of-another-scheme", lambda c: validate(c, source="s3://bucket/flowers"),
         r"`source` uses s3://, which kftune cannot read or write"),
    Case("validate/export-to-another-scheme", lambda c: validate(c, export_destination="s3://bucket/models"),
         r"`export_destination` uses s3://"),
    Case("validate/more-workers-than-trials", lambda c: validate(c, max_trials=8, parallel_trials=9),
         r"`parallel_trials`=9 is more than `max_trials`=8"),
    Case("validate/grid-larger-than-max-trials", lambda c: validate(c, search_algorithm="grid", max_trials=12),
         r"more than the 9 points of the grid"),
    Case("validate/learning-rate-nan", lambda c: validate(c, finetune_learning_rate=float("nan")),
         r"`finetune_learning_rate` must be a finite number"),
    Case("validate/negative-seed", lambda c: validate(c, seed=-1), r"`seed` must be a whole number >= 0"),
    Case("validate/too-many-augmented-copies", lambda c: validate(c, augment_copies=100000),
         r"`augment_copies` must be at most 50"),
    Case("validate/export-destination-is-a-file", lambda c: validate(c, export_destination=_file(c, "models", b"x")),
         r"`export_destination` `.*models` is a file"),
    Case("validate/export-destination-under-a-file",
         lambda c: validate(c, export_destination=_file(c, "f", b"x") + "/models"), r"is under `.*f`, which is a file"),
    Case("validate/checkpoints-under-a-file", lambda c: validate(c, checkpoint_uri=_file(c, "ck", b"x") + "/run"),
         r"`checkpoint_uri` `.*ck/run` is under"),
    Case("validate/weights-file-missing", lambda c: validate(c, backbone="mobilenet_v2", weights=str(c.tmp / "w.h5")),
         r"`weights` `.*w.h5` does not exist"),
    # Found by the validation step on a CPU pod, not by fine-tune on a GPU node that the backend would retry.
    Case("validate/weights-file-that-does-not-fit",
         lambda c: validate(c, backbone="mobilenet_v2_035", weights=_file(c, "w.h5", b"not weights")),
         r"weights file `.*w\.h5` does not fit MobileNetV2\(include_top=False\)"),
    Case("validate/export-version-taken", lambda c: (_existing_version(c), validate(c, export_destination=str(c.tmp / "exports"), export_version="1"))[1],
         r"`export_version` `1` already exists"),
    Case("validate/export-version-not-a-number", lambda c: validate(c, export_version="v1"),
         r"`export_version` must be a whole number >= 1 \(TF Serving and KServe load <base>/<N>/ with N an integer\), or "
         r"empty for the next free number\. Received: export_version='v1'"),
    Case("validate/backbone-input-size-beyond-bound", lambda c: validate(c, backbone_input_size=100000),
         r"`backbone_input_size` must be at most 1024"),
    Case("validate/trials-beyond-bound", lambda c: validate(c, max_trials=100000), r"`max_trials` must be at most"),
    # evaluate
    Case("evaluate/tflite-file-that-is-no-model",
         lambda c: evaluate(c, model=str(Path(_file(c, "m/x.tflite", b"garbage")).parent), tflite_file="x.tflite"),
         r"`.*model_int8\.tflite` is not a loadable TFLite model"),
    Case("evaluate/labels-other-than-the-model's-classes", lambda c: evaluate(c, data=str(c.fixture("three_class_dir"))),
         r"model `.*model\.keras` was trained on classes .* but the dataset has \['x', 'y', 'z'\]"),
    Case("evaluate/min-accuracy-above-1", lambda c: evaluate(c, min_accuracy=2.0), r"`min_accuracy` must be in \[0, 1\]"),
    # export
    Case("export/version-escaping-the-destination", lambda c: export(c, export_version="../v1"),
         r"`export_version` must be a whole number >= 1 .* Received: export_version='\.\./v1'"),
    Case("export/destination-without-bucket", lambda c: export(c, export_destination="gs:///models"),
         r"`gs:///models` names no bucket: write it as gs://BUCKET/PATH"),
    Case("export/destination-bucket-missing", lambda c: export(c, export_destination=f"{_missing_bucket(c)}/models"),
         rf"GCS bucket `{MISSING}` does not exist", code=3),
    Case("export/version-already-exists", lambda c: (_existing_version(c), export(c))[1],
         r"`.*exports/1` already exists and kftune never overwrites an export", after=_existing_version_unchanged),
    Case("export/model-that-is-no-model", lambda c: export(c, model=_not_a_model(c)),
         r"`.*not-a-model/model\.keras` is not a loadable Keras model", after=_nothing_exported),
    # pipeline parameters, through kftune run-local
    Case("pipeline/number-of-wrong-type", lambda c: run_local(c, "max_trials=three"),
         r"pipeline parameter `max_trials` must be integer. Received: 'three'"),
    Case("pipeline/unknown-parameter", lambda c: run_local(c, "target_sparsty=0.5"),
         r"unknown pipeline parameter `target_sparsty`"),
    Case("pipeline/negative-epochs", lambda c: run_local(c, "trial_epochs=-1"), r"`trial_epochs` must be a whole number >= 1"),
    Case("pipeline/unknown-quantization", lambda c: run_local(c, "prune_quantize=fp16"),
         r"`prune_quantize` takes a comma-separated subset"),
    # serve: what `kftune serve` loads, and the images of a request
    Case("serve/no-such-version", lambda c: serve(c, str(c.tmp / "models" / "3")),
         r"`.*models/3` is neither an exported version nor a model base holding one"),
    Case("serve/a-model-folder-that-is-no-export", lambda c: serve(c, str(c.fixture("trained_model_dir"))),
         r"is neither an exported version nor a model base holding one: give <base>/<N>"),
    Case("serve/port-out-of-range", lambda c: serve(c, str(c.tmp), "--port", "70000"), r"--port must be 1-65535"),
    Case("serve/name-that-is-no-url-part", lambda c: serve(c, str(c.tmp), "--name", "my/model"),
         r"--name must be letters, digits.*Received: 'my/model'"),
    Case("serve/request-with-no-images", lambda c: serve_request(c, []), r"the request holds no images: send at least one"),
    Case("serve/request-over-the-batch-limit", lambda c: serve_request(c, [_jpeg()] * 65),
         r"the request holds 65 images, over the limit of 64 a request: split it"),
    Case("serve/image-that-is-no-image", lambda c: serve_request(c, [_jpeg(), b"plain text"]),
         r"image 1 is not an image kftune can decode \(.*\): send a JPEG, PNG, GIF or BMP file"),
    Case("serve/empty-image", lambda c: serve_request(c, [b""]), r"image 0 is empty: send the bytes of a JPEG"),
    Case("serve/image-over-the-size-limit", lambda c: serve_request(c, [b"\xff\xd8" + bytes(16 * 2**20)]),
         r"image 0 is 16777218 bytes, over the limit of 16777216: send a smaller file"),
    Case("serve/decompression-bomb", lambda c: serve_request(c, [_png_declaring(10_000, 10_000)]),
         r"image 0 declares 100000000 pixels, over the limit of 50000000: send a smaller image"),
    Case("serve/keys-that-do-not-pair-with-the-images", lambda c: serve_request(c, [_jpeg(), _jpeg()], ("a",)),
         r"the request has 1 keys for 2 images: give one key per image or none"),
]


@pytest.fixture(scope="module")
def three_class_dir(tmp_path_factory):
    """A real 16x16 RGB dataset whose classes (x, y, z) are not the trained model's (the digits 0-9)."""
    source = _class_folders(tmp_path_factory.mktemp("three-source"), {"x": 6, "y": 6, "z": 6}, size=(16, 16))
    folder = tmp_path_factory.mktemp("three")
    dataset.ingest(dataset.IngestConfig(source=str(source), image_size=16), folder, progress=lambda _: None)
    return folder


@pytest.fixture(scope="module")
def served_version(trained_model_dir, digits_dir, tmp_path_factory):
    """The trained model exported and loaded as `kftune serve` loads it (kftune.serving.Servable)."""
    from kftune import serving

    uri, _ = export_core.export(trained_model_dir, str(tmp_path_factory.mktemp("served")), {"source_run": "matrix"},
                                dataset_dir=digits_dir)
    return serving.Servable(uri)


@pytest.fixture(scope="module")
def digits8_dir(tmp_path_factory):
    """The digits at 8x8: the trained model's classes, another image shape."""
    folder = tmp_path_factory.mktemp("digits8")
    dataset.ingest(dataset.IngestConfig(image_size=8), folder, progress=lambda _: None)
    return folder


def test_the_matrix_covers_every_component_with_at_least_30_inputs():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    steps = {case.id.split("/")[0] for case in CASES}
    assert steps >= {"validate", "ingest", "augment", "search", "finetune", "prune", "evaluate", "export", "pipeline",
                     "serve"}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_stops_with_one_line_naming_it(case, request, tmp_path, monkeypatch, capsys):
    import re

    ctx = Ctx(request, tmp_path, monkeypatch)
    func, kwargs = case.call(ctx)
    capsys.readouterr()  # what building the input printed is not the step's output
    with pytest.raises(SystemExit) as stopped:
        func(**kwargs)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kftune:")]
    assert stopped.value.code == case.code, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    prefix = "kftune: storage error: " if case.code == 3 else "kftune: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(case.message, lines[0]), lines[0]
    assert "Traceback" not in err, err[-2000:]
    if case.after is not None:
        case.after(ctx)


def test_corrupt_images_under_the_threshold_are_skipped_and_counted(tmp_path, capsys):
    """One bad file in an otherwise good dataset: skipped, counted in the report, not fatal."""
    root = _class_folders(tmp_path / "src", {"cat": 12, "dog": 12})
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing useful")
    _truncate(root / "dog" / "3.png")
    func, kwargs = ingest(Ctx(None, tmp_path, None), source=str(root), max_corrupt_fraction=0.1)
    func(**kwargs)
    info = dataset.DatasetInfo.load(kwargs["dataset"].path)
    assert info.skipped == 2 and sum(info.splits.values()) == 23
    assert kwargs["dataset"].metadata["skipped"] == 2
    assert "| skipped (undecodable) | 2 |" in Path(kwargs["summary"].path).read_text()


def test_images_of_mixed_sizes_formats_and_channels_are_resized_not_refused(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(2)
    root = _class_folders(tmp_path / "src", {"a": 4, "b": 4})
    (root / "a" / "gray.png").write_bytes(_png(rng, (30, 7, 1)))
    (root / "a" / "rgba.png").write_bytes(_png(rng, (3, 50, 4)))
    (root / "b" / "photo.jpg").write_bytes(tf.io.encode_jpeg(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).numpy())
    (root / "b" / "deep.png").write_bytes(tf.io.encode_png(rng.integers(0, 65535, (12, 12, 3), dtype=np.uint16)).numpy())
    for channels in (1, 3):
        info = dataset.ingest(dataset.IngestConfig(source=str(root), image_size=8, channels=channels),
                              tmp_path / f"out{channels}", progress=lambda _: None)
        assert info.skipped == 0 and sum(info.splits.values()) == 12
        images, _ = dataset.load_arrays(tmp_path / f"out{channels}", "train")
        assert images.shape[1:] == (8, 8, channels)


def test_tfrecord_ingest_matches_what_was_written(tmp_path):
    """The streaming TFRecord reader returns every example once, with its own image and label."""
    examples = _examples(40, classes=4)
    info = dataset.ingest(dataset.IngestConfig(source=str(_tfrecords(tmp_path / "src", examples)), image_size=9,
                                               channels=1), tmp_path / "out", progress=lambda _: None)
    assert sum(info.splits.values()) == 40
    import tensorflow as tf

    written = sorted((tf.io.decode_png(e["image"]).numpy().tobytes(), e["label"]) for e in examples)
    read = []
    for split in dataset.SPLITS:
        images, labels = dataset.load_arrays(tmp_path / "out", split)
        read += [(image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)]
    assert sorted(read) == written


def test_a_damaged_record_is_skipped_and_counted_like_a_corrupt_image(tmp_path):
    root = _tfrecords(tmp_path / "src", _examples(30, classes=3))
    shard = root / "data-00000.tfrecord"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first record's data: its checksum no longer holds, its framing does
    shard.write_bytes(bytes(data))
    info = dataset.ingest(dataset.IngestConfig(source=str(root), image_size=9, channels=1, max_corrupt_fraction=0.1),
                          tmp_path / "out", progress=lambda _: None)
    assert info.skipped == 1 and sum(info.splits.values()) == 29
    assert json.loads((tmp_path / "out" / dataset.INFO_FILE).read_text())["skipped"] == 1
