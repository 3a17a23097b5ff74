"""kftune.augment against ImageDataGenerator, its two resampling paths against each other, and its data handling."""

import base64
import json
import re

import numpy as np
import pytest
import tensorflow as tf
from tf_keras.preprocessing.image import ImageDataGenerator, apply_affine_transform

from kftune import augment, dataset
from kftune.errors import InputError

BACKENDS = ("opencv", "tf")
SIZE = 32


@pytest.fixture(scope="module")
def photo():
    """A real RGB photo (scikit-learn's sample), SIZE x SIZE, float32 0..255 with integer values."""
    from sklearn.datasets import load_sample_image

    image = tf.image.resize(load_sample_image("china.jpg")[None, 40:400, 100:460], (SIZE, SIZE), antialias=True)
    return np.round(image.numpy()[0]).astype(np.float32)


@pytest.fixture(scope="module")
def photos():
    """Eight real RGB photos, uint8: crops of scikit-learn's two samples."""
    from sklearn.datasets import load_sample_images

    crops = [image[top : top + 300, left : left + 300] for image in load_sample_images().images
             for top, left in ((0, 0), (100, 200), (120, 40), (50, 330))]
    return tf.cast(tf.round(tf.image.resize(np.stack(crops), (48, 48), antialias=True)), tf.uint8).numpy()


def pinned(**values):
    """Parameters for one image, as draw() would give them, with every transform off unless set."""
    params = dict(theta=0.0, tx=0.0, ty=0.0, shear=0.0, zx=1.0, zy=1.0, flip_h=False, flip_v=False,
                  brightness=1.0, contrast=1.0)
    params.update(values)
    return {k: tf.constant([v], tf.bool if isinstance(v, bool) else tf.float32) for k, v in params.items()}


def kftune_apply(image, spec, backend, **values):
    return augment.apply(image[None], pinned(**values), spec, backend)[0].numpy()


def idg_params(values: dict) -> dict:
    """The same transform in apply_transform's terms: shifts in pixels, tx along the width."""
    return {
        "theta": values.get("theta", 0), "tx": values.get("tx", 0) * SIZE, "ty": values.get("ty", 0) * SIZE,
        "shear": values.get("shear", 0), "zx": values.get("zx", 1), "zy": values.get("zy", 1),
        "flip_horizontal": values.get("flip_h", False), "flip_vertical": values.get("flip_v", False),
    }


TRANSFORMS = {
    "rotate +30": dict(theta=30.0),
    "rotate -70": dict(theta=-70.0),
    "width shift": dict(tx=0.2),
    "height shift": dict(ty=-0.15),
    "shear": dict(shear=20.0),
    "zoom x": dict(zx=0.7),
    "zoom y": dict(zy=1.3),
    "horizontal flip": dict(flip_h=True),
    "vertical flip + rotate": dict(flip_v=True, theta=20.0),
    "all at once": dict(theta=15.0, tx=0.1, ty=0.05, shear=10.0, zx=0.8, zy=1.2, flip_h=True),
}


# ---------------------------------------------------------------- each transform as ImageDataGenerator does it


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_transform_matches_image_data_generator(photo, name, backend):
    values = TRANSFORMS[name]
    expected = ImageDataGenerator(fill_mode="nearest").apply_transform(photo, idg_params(values))
    got = kftune_apply(photo, augment.AugmentSpec(), backend, **values)
    assert np.abs(expected - photo).mean() > 5, "the transform must change the photo for the test to mean anything"
    np.testing.assert_allclose(got, expected, atol=0.01)


# ImageDataGenerator passes fill_mode straight to SciPy. kftune's constant and wrap
# are SciPy's grid-constant and grid-wrap: its `constant` leaves the one-pixel band
# along the border unblended, and its `wrap` has a period one pixel short.
FILL_MODES = {"nearest": "nearest", "reflect": "reflect", "constant": "grid-constant", "wrap": "grid-wrap"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_fill_modes_match_scipy(photo, fill_mode, backend):
    values = TRANSFORMS["all at once"] | {"tx": 0.3, "zx": 1.3}
    p = idg_params(values)
    expected = apply_affine_transform(photo, p["theta"], p["tx"], p["ty"], p["shear"], p["zx"], p["zy"], row_axis=0,
                                      col_axis=1, channel_axis=2, fill_mode=FILL_MODES[fill_mode], cval=77.0)
    expected = expected[:, ::-1]  # flip_h, which ImageDataGenerator applies after the warp
    got = kftune_apply(photo, augment.AugmentSpec(fill_mode=fill_mode, cval=77), backend, **values)
    np.testing.assert_allclose(got, expected, atol=0.01)


def test_width_shift_moves_columns_and_height_shift_rows(photo):
    """The names mean what they say (ImageDataGenerator's random draw swaps them: keras-team/tf-keras#310)."""
    rows = np.broadcast_to(np.arange(SIZE, dtype=np.float32)[:, None, None] * 8, (SIZE, SIZE, 1))
    columns = np.ascontiguousarray(np.swapaxes(rows, 0, 1))
    for backend in BACKENDS:
        spec = augment.AugmentSpec(width_shift_range=0.3)
        # Horizontal stripes do not change under a horizontal shift; vertical ones do.
        np.testing.assert_array_equal(augment.augment_batch(np.stack([rows] * 8), spec, [0, 1], backend),
                                      np.stack([rows] * 8))
        assert not np.array_equal(augment.augment_batch(np.stack([columns] * 8), spec, [0, 1], backend),
                                  np.stack([columns] * 8))
        spec = augment.AugmentSpec(height_shift_range=0.3)
        np.testing.assert_array_equal(augment.augment_batch(np.stack([columns] * 8), spec, [0, 1], backend),
                                      np.stack([columns] * 8))
        assert not np.array_equal(augment.augment_batch(np.stack([rows] * 8), spec, [0, 1], backend),
                                  np.stack([rows] * 8))


def test_brightness_matches_image_data_generator(photo):
    spec = augment.AugmentSpec(brightness_range=(0.5, 1.5))
    for factor in (0.6, 1.4):
        # ImageDataGenerator goes through an 8-bit PIL image, so it rounds.
        expected = ImageDataGenerator().apply_transform(photo, {"brightness": factor})
        for backend in BACKENDS:
            np.testing.assert_allclose(kftune_apply(photo, spec, backend, brightness=factor), expected, atol=1.0)


def test_contrast_of_gray_images_is_tf_adjust_contrast(photo):
    gray = photo[..., :1]
    spec = augment.AugmentSpec(contrast_range=(0.5, 2.0))
    for factor in (0.5, 1.8):
        expected = tf.clip_by_value(tf.image.adjust_contrast(gray, factor), 0, 255).numpy()
        for backend in BACKENDS:
            np.testing.assert_allclose(kftune_apply(gray, spec, backend, contrast=factor), expected, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flips_mirror_exactly(photos, backend):
    for spec, mirror in ((augment.AugmentSpec(horizontal_flip=True), lambda x: x[:, ::-1]),
                         (augment.AugmentSpec(vertical_flip=True), lambda x: x[::-1])):
        out = augment.augment_batch(photos, spec, [3, 4], backend).numpy()
        flipped = [np.array_equal(o, mirror(p)) for o, p in zip(out, photos, strict=True)]
        kept = [np.array_equal(o, p) for o, p in zip(out, photos, strict=True)]
        assert all(f != k for f, k in zip(flipped, kept, strict=True)), "each image is either mirrored or kept, exactly"
        assert any(flipped) and any(kept)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_zero_ranges_give_the_input_back(photos, backend, fill_mode):
    spec = augment.AugmentSpec(zoom_range=[1.0, 1.0], brightness_range=[1, 1], contrast_range=[1, 1],
                               fill_mode=fill_mode)
    out = augment.augment_batch(photos, spec, [1, 2], backend)
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), photos.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "dtype"), [((3, 16, 16, 1), np.uint8), ((2, 20, 20, 3), np.float32),
                                              ((4, 9, 9, 3), np.uint8)])
def test_shapes_dtypes_and_range_are_kept(shape, dtype, backend):
    images = (np.random.default_rng(0).random(shape) * 255).astype(dtype)
    spec = augment.AugmentSpec(**augment.CLASSIC.to_dict() | {"brightness_range": [0.2, 3], "contrast_range": [0, 3]})
    out = augment.augment_batch(images, spec, [5, 6], backend)
    assert out.shape == shape and out.dtype == tf.float32
    assert 0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255


# ---------------------------------------------------------------- the two paths agree


@pytest.mark.parametrize("fill_mode", augment.FILL_MODES)
def test_opencv_and_tensorflow_paths_agree(photos, fill_mode):
    spec = augment.AugmentSpec(**augment.CLASSIC.to_dict() | {"fill_mode": fill_mode, "cval": 50, "vertical_flip": True,
                                                              "brightness_range": [0.7, 1.3], "contrast_range": [0.7, 1.3]})
    for images in (photos, photos.astype(np.float32)):
        cv = augment.augment_batch(images, spec, [7, 8], "opencv").numpy()
        tf_op = augment.augment_batch(images, spec, [7, 8], "tf").numpy()
        assert np.abs(cv - photos).mean() > 10, "the draw must transform the photos for the test to mean anything"
        diff = np.abs(cv - tf_op)
        if images.dtype == np.float32:
            assert diff.max() < 0.01
        else:
            # uint8 images are warped as uint8: rounded (0.5) and, in OpenCV 4,
            # positioned to 1/32 pixel. A wrong matrix or border differs by tens.
            assert diff.mean() < 0.4 and np.percentile(diff, 99) <= 1.0 and diff.max() <= 4.0


def test_opencv_warps_uint8_images_as_their_float32_copies(photos):
    """uint8 images are converted to float32 before OpenCV's warp: no rounding, and the TF op's result to 0.01."""
    for fill_mode in augment.FILL_MODES:
        spec = augment.AugmentSpec(**augment.CLASSIC.to_dict() | {"fill_mode": fill_mode, "cval": 50})
        from_uint8 = augment.augment_batch(photos, spec, [9, 10], "opencv").numpy()
        from_float = augment.augment_batch(photos.astype(np.float32), spec, [9, 10], "opencv").numpy()
        np.testing.assert_array_equal(from_uint8, from_float)
        assert not np.array_equal(from_uint8, np.round(from_uint8)), "a uint8 warp would give whole numbers"
        tf_op = augment.augment_batch(photos, spec, [9, 10], "tf").numpy()
        np.testing.assert_allclose(from_uint8, tf_op, atol=0.01)


def test_auto_backend_and_bad_backend():
    expected = "tf" if tf.config.list_physical_devices("GPU") else "opencv"
    assert augment.resolve_backend("auto") == expected
    assert augment.resolve_backend("auto", input_pipeline=True) == "opencv"
    assert augment.resolve_backend("tf", input_pipeline=True) == "tf"
    with pytest.raises(InputError, match="`backend`.*'gpu'"):
        augment.resolve_backend("gpu")


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_seed_gives_the_same_images(photos, backend):
    first = augment.augment_batch(photos, augment.CLASSIC, [11, 12], backend).numpy()
    again = augment.augment_batch(photos, augment.CLASSIC, [11, 12], backend).numpy()
    other = augment.augment_batch(photos, augment.CLASSIC, [11, 13], backend).numpy()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 5


def test_training_batches_repeat_with_a_seed_and_change_each_epoch(photos):
    labels = np.arange(len(photos))
    data = tf.data.Dataset.from_tensor_slices((photos, labels))

    def epochs(seed):
        batches = augment.training_batches(data, augment.CLASSIC, 4, seed).repeat(2)
        return [(x, y) for x, y in batches.as_numpy_iterator()]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert [b[0].dtype for b in first] == [np.float32] * 4 and [len(b[0]) for b in first] == [4, 4, 4, 4]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert sorted(np.concatenate([y for _, y in first[:2]])) == list(labels), "one epoch holds every image once"
    epoch1 = dict(zip(np.concatenate([y for _, y in first[:2]]), np.concatenate([x for x, _ in first[:2]]), strict=True))
    epoch2 = dict(zip(np.concatenate([y for _, y in first[2:]]), np.concatenate([x for x, _ in first[2:]]), strict=True))
    assert all(not np.array_equal(epoch1[k], epoch2[k]) for k in labels), "each epoch draws new transforms"
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_grouped_batches_are_the_batches_augmented_one_at_a_time():
    """Small images are augmented several batches per call: each batch keeps its own seed pair and size."""
    images = np.random.default_rng(0).integers(0, 256, (100, 16, 16, 3), dtype=np.uint8)
    data = tf.data.Dataset.from_tensor_slices((images, np.arange(len(images))))
    assert augment.batches_per_call((16, 16, 3), 8) == augment.GROUP_MAX
    assert augment.batches_per_call((224, 224, 3), 32) == 1  # 19 MB a batch: splitting would copy it
    # One batch at a time, as augment_batch draws: the same shuffle, then each batch with the next seed pair.
    shuffled = data.shuffle(augment.shuffle_buffer(data), seed=5, reshuffle_each_iteration=True).batch(8)
    seeds = tf.data.Dataset.random(seed=5, rerandomize_each_iteration=True).batch(2)
    expected = tf.data.Dataset.zip((shuffled, seeds)).map(
        lambda xy, s: (augment.augment_batch(xy[0], augment.CLASSIC, s, "opencv"), xy[1]))
    got = list(augment.training_batches(data, augment.CLASSIC, 8, 5, backend="opencv").as_numpy_iterator())
    want = list(expected.as_numpy_iterator())
    assert [len(y) for _, y in got] == [8] * 12 + [4]  # 100 images: the last batch is short, as batch() leaves it
    for (x, y), (wx, wy) in zip(got, want, strict=True):
        np.testing.assert_array_equal(y, wy)
        np.testing.assert_array_equal(x, wx)


def test_training_batches_without_a_spec_are_not_augmented(photos):
    data = tf.data.Dataset.from_tensor_slices((photos, np.arange(len(photos))))
    for spec in (None, augment.AugmentSpec()):
        for x, y in augment.training_batches(data, spec, 8, 0).as_numpy_iterator():
            np.testing.assert_array_equal(x, photos[y])


# ---------------------------------------------------------------- offline and online materialize


def shard_bytes(folder, split):
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"{split}-*.tfrecord"))}


def test_offline_shards_read_back_with_the_originals_and_k_variants(digits_dir, tmp_path):
    source = dataset.DatasetInfo.load(digits_dir)
    info = augment.materialize(digits_dir, tmp_path / "out", augment.MILD, copies=2, seed=3, batch_size=500)
    n = source.splits["train"]
    assert info.splits["train"] == 3 * n and info.augment is None
    assert dataset.DatasetInfo.load(tmp_path / "out") == info
    images, labels = dataset.load_arrays(tmp_path / "out", "train")
    originals, original_labels = dataset.load_arrays(digits_dir, "train")
    assert images.shape == (3 * n, *source.shape) and images.dtype == np.uint8
    # Per batch of 500: the originals, then each copy of them.
    np.testing.assert_array_equal(images[:500], originals[:500])
    for k in (1, 2):
        np.testing.assert_array_equal(labels[500 * k : 500 * (k + 1)], original_labels[:500])
        variants = images[500 * k : 500 * (k + 1)].astype(float)
        assert np.abs(variants - originals[:500]).mean() > 5
    assert np.abs(images[500:1000].astype(float) - images[1000:1500]).mean() > 5, "copies differ from each other"
    np.testing.assert_array_equal(np.sort(labels), np.sort(np.tile(original_labels, 3)))
    for split in ("validation", "test"):
        assert shard_bytes(tmp_path / "out", split) == shard_bytes(digits_dir, split), f"{split} must be untouched"
    again = augment.materialize(digits_dir, tmp_path / "again", augment.MILD, copies=2, seed=3, batch_size=500)
    other = augment.materialize(digits_dir, tmp_path / "other", augment.MILD, copies=2, seed=4, batch_size=500)
    assert again.fingerprint == info.fingerprint != other.fingerprint


def test_online_mode_copies_the_data_and_records_the_spec(digits_dir, tmp_path):
    info = augment.materialize(digits_dir, tmp_path / "out", augment.CLASSIC, copies=0)
    assert augment.AugmentSpec.from_dict(dataset.DatasetInfo.load(tmp_path / "out").augment) == augment.CLASSIC
    for split in dataset.SPLITS:
        assert shard_bytes(tmp_path / "out", split) == shard_bytes(digits_dir, split)
    assert info.fingerprint == dataset.DatasetInfo.load(digits_dir).fingerprint
    # An empty spec means no augmentation, online or off: nothing is recorded or duplicated.
    none = augment.materialize(digits_dir, tmp_path / "none", augment.AugmentSpec(), copies=3)
    assert none.augment is None and none.splits == info.splits


def test_negative_copies_are_refused(digits_dir, tmp_path):
    with pytest.raises(InputError, match="`copies`.*-1"):
        augment.materialize(digits_dir, tmp_path, augment.CLASSIC, copies=-1)


# ---------------------------------------------------------------- spec errors


@pytest.mark.parametrize(("text", "message"), [
    ("rotaton_range: 40", r"unknown augment key `rotaton_range` \(did you mean `rotation_range`\?\)"),
    ("rotation_range: 200", r"`rotation_range` must be a number in \[0.0, 180.0\]. Received: rotation_range=200"),
    ("width_shift_range: -0.1", r"`width_shift_range`.*Received: width_shift_range=-0.1"),
    ("height_shift_range: '0.2'", r"`height_shift_range`.*Received: height_shift_range='0.2'"),
    ("shear_range: 90", r"`shear_range`.*Received: shear_range=90"),
    ("zoom_range: 1.5", r"`zoom_range`.*Received: zoom_range=1.5"),
    ("zoom_range: [1.2, 0.8]", r"`zoom_range` needs .*min <= max.*Received: zoom_range=\[1.2, 0.8\]"),
    ("brightness_range: 1.2", r"`brightness_range` must be a pair of numbers"),
    ("contrast_range: [a, b]", r"`contrast_range` must be a pair of numbers"),
    ("horizontal_flip: 1", r"`horizontal_flip` must be true or false"),
    ("fill_mode: mirror", r"`fill_mode` must be one of \('nearest', 'reflect', 'constant', 'wrap'\). Received: fill_mode='mirror'"),
    ("cval: 300", r"`cval`.*Received: cval=300"),
    ("rotation_range: [40", r"augment spec is not valid YAML"),
    ("- rotation_range", r"augment spec must be a YAML mapping"),
])
def test_bad_specs_are_refused_with_a_message_naming_the_key(text, message):
    with pytest.raises(InputError, match=message):
        augment.AugmentSpec.from_yaml(text)


def test_specs_round_trip_and_empty_means_none():
    for spec in (augment.CLASSIC, augment.MILD):
        assert augment.AugmentSpec.from_yaml(augment.yaml.safe_dump(spec.to_dict())) == spec
    assert augment.AugmentSpec.from_yaml(augment.CLASSIC_YAML) == augment.CLASSIC
    assert augment.AugmentSpec.from_yaml("").is_identity and augment.AugmentSpec.from_yaml("{}").is_identity
    assert augment.AugmentSpec.from_yaml("zoom_range: 0.2").zoom_range == (0.8, 1.2)


# ---------------------------------------------------------------- preview and the KFP component


def embedded_png(html: str) -> np.ndarray:
    match = re.search(r'src="data:image/png;base64,([^"]+)"', html)
    assert match, "the preview embeds its grid as a PNG"
    return tf.io.decode_png(base64.b64decode(match.group(1))).numpy()


def test_preview_grid_shows_originals_and_their_variants(digits_dir):
    originals, variants = augment.preview_grid(digits_dir, augment.MILD, images=4, variants=3)
    assert originals.shape == (4, 16, 16, 3) and variants.shape == (4, 3, 16, 16, 3) and variants.dtype == np.uint8
    assert all(np.abs(variants[:, v].astype(float) - originals).mean() > 3 for v in range(3))
    grid = embedded_png(augment.preview_html(digits_dir, augment.MILD, mode="online", spec_text="rotation_range: 10"))
    assert grid.shape[0] > 200 and grid.shape[1] > 200 and grid.std() > 10


def test_component_writes_offline_shards_metadata_and_preview(digits_dir, tmp_path):
    from kfp.dsl import HTML, Dataset

    from components.augment import augment as component

    augmented, preview = Dataset(uri=str(tmp_path / "augmented")), HTML(uri=str(tmp_path / "preview.html"))
    component.python_func(dataset=Dataset(uri=str(digits_dir)), augmented=augmented, preview=preview,
                          config=json.dumps({"augment_spec": augment.CLASSIC_YAML, "augment_copies": 1, "seed": 0}))
    train = dataset.DatasetInfo.load(digits_dir).splits["train"]
    assert augmented.metadata["mode"] == "offline" and augmented.metadata["splits"]["train"] == 2 * train
    assert augmented.metadata["spec"] == augment.CLASSIC.to_dict()
    assert len(dataset.load_arrays(augmented.path, "train")[0]) == 2 * train
    page = (tmp_path / "preview.html").read_text()
    assert "offline" in page and embedded_png(page).shape[-1] in (3, 4)


def test_component_exits_with_the_input_error_for_a_bad_spec(digits_dir, tmp_path, capsys):
    from kfp.dsl import HTML, Dataset

    from components.augment import augment as component
    from kftune.errors import EXIT_INPUT

    with pytest.raises(SystemExit) as exited:
        component.python_func(dataset=Dataset(uri=str(digits_dir)), augmented=Dataset(uri=str(tmp_path / "a")),
                              preview=HTML(uri=str(tmp_path / "p.html")),
                              config=json.dumps({"augment_spec": "fill_mode: mirror", "augment_copies": 0, "seed": 0}))
    assert exited.value.code == EXIT_INPUT
    assert "fill_mode" in capsys.readouterr().err


def test_bundled_photo_helper_is_what_it_claims(photo):
    # The tests above lean on a photo with texture everywhere: a flat image would let wrong geometry pass.
    assert photo.shape == (SIZE, SIZE, 3) and photo.std() > 20
    assert np.abs(np.diff(photo, axis=0)).mean() > 3 and np.abs(np.diff(photo, axis=1)).mean() > 3



def test_shuffle_buffer_stays_within_its_byte_budget_at_every_image_size():
    counts = {}
    for size in (8, 32, 96, 224, 512, 1024):
        data = tf.data.Dataset.from_tensors((tf.zeros((size, size, 3), tf.uint8), tf.constant(0, tf.int64)))
        counts[size] = augment.shuffle_buffer(data)
        assert 1 <= counts[size] * size * size * 3 <= augment.SHUFFLE_BUFFER_BYTES, (size, counts[size])
    assert counts[8] == counts[32] == augment.SHUFFLE_BUFFER_MAX  # small images: the count cap binds
    assert counts[96] > counts[224] > counts[512] > counts[1024], counts  # large ones: the byte budget
    assert counts[224] == augment.SHUFFLE_BUFFER_BYTES // (224 * 224 * 3)
