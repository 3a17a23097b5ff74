"""The classic ImageDataGenerator transforms, rebuilt to run inside tf.data.

Users know augmentation as ``ImageDataGenerator(rotation_range=40,
width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2, zoom_range=0.2,
horizontal_flip=True, fill_mode='nearest')``. :class:`AugmentSpec` takes those
names with the same meanings (angles in degrees, shifts as fractions of the
image, zoom factors drawn from ``[1 - zoom_range, 1 + zoom_range]``), plus
vertical flips, brightness and contrast.

As in Keras' preprocessing layers, drawing the random parameters
(:func:`draw`) is kept apart from applying them (:func:`apply`), so the same
draw can be checked pixel by pixel. All geometric transforms and flips of one
image are fused into a single affine matrix, so each image is resampled once.
Randomness is stateless: the same seed gives the same augmented images.

The geometry is ImageDataGenerator's ``apply_affine_transform``: the same
matrices, composed in the same order about the image centre, resampled
bilinearly with the same fill modes. Three of its quirks are not copied:
``get_random_transform`` feeds ``width_shift_range`` into the vertical offset and
``height_shift_range`` into the horizontal one (keras-team/tf-keras#310);
SciPy's ``wrap``, which it uses, has a period one pixel short; and SciPy's
``constant`` does not blend the one-pixel band along the border with ``cval``.
kftune shifts as the names say, and its ``wrap`` and ``constant`` are SciPy's
``grid-wrap`` and ``grid-constant``.

Two paths apply the same drawn matrices (:data:`BACKENDS`): OpenCV's
``warpAffine``, the fastest on a CPU (docs/benchmarks.md), and TensorFlow's
``ImageProjectiveTransformV3`` op, which also runs on a GPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import shutil
from pathlib import Path

import numpy as np
import yaml

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset
from kftune.errors import InputError, check_whole_numbers

FILL_MODES = ("nearest", "reflect", "constant", "wrap")
BACKENDS = ("auto", "opencv", "tf")
# SciPy's (so ImageDataGenerator's) `reflect` repeats the edge pixel: OpenCV's
# BORDER_REFLECT, not BORDER_REFLECT_101 (which is SciPy's `mirror`).
_CV2_BORDERS = {"nearest": "BORDER_REPLICATE", "reflect": "BORDER_REFLECT", "constant": "BORDER_CONSTANT",
                "wrap": "BORDER_WRAP"}


def _range(name: str, value, low: float, high: float) -> tuple[float, float] | None:
    """Validates a [min, max] factor range such as brightness_range."""
    if value is None:
        return None
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        raise InputError(f"augment `{name}` must be a pair of numbers [min, max]. Received: {name}={value!r}")
    lo, hi = (float(v) for v in value)
    if not low <= lo <= hi <= high:
        raise InputError(f"augment `{name}` needs {low} <= min <= max <= {high}. Received: {name}={value!r}")
    return (lo, hi)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Random image transforms, with ImageDataGenerator's parameter names and meanings.

    Attributes:
        rotation_range: Rotate by an angle drawn from [-r, r] degrees.
        width_shift_range: Shift horizontally by a fraction of the width drawn from [-r, r].
        height_shift_range: Shift vertically by a fraction of the height drawn from [-r, r].
        shear_range: Shear by an angle drawn from [-r, r] degrees (as ImageDataGenerator).
        zoom_range: A float r (factors from [1 - r, 1 + r]) or a pair [lo, hi];
            x and y factors are drawn independently, as ImageDataGenerator does.
        horizontal_flip: Mirror left-right with probability 1/2.
        vertical_flip: Mirror top-bottom with probability 1/2.
        brightness_range: Multiply pixel values by a factor drawn from [lo, hi].
        contrast_range: Scale each image's deviation from its mean by a factor from [lo, hi].
        fill_mode: How points outside the image are filled: nearest, reflect, constant or wrap.
        cval: The fill value for ``fill_mode='constant'`` (0..255).
    """

    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    shear_range: float = 0.0
    zoom_range: float | tuple[float, float] = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    brightness_range: tuple[float, float] | None = None
    contrast_range: tuple[float, float] | None = None
    fill_mode: str = "nearest"
    cval: float = 0.0

    def __post_init__(self):
        checks = {
            "rotation_range": (0.0, 180.0),
            "width_shift_range": (0.0, 1.0),
            "height_shift_range": (0.0, 1.0),
            "shear_range": (0.0, 89.0),
            "cval": (0.0, 255.0),
        }
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise InputError(f"augment `{name}` must be a number in [{low}, {high}]. Received: {name}={value!r}")
        zoom = self.zoom_range
        if isinstance(zoom, int | float) and not isinstance(zoom, bool):
            if not 0.0 <= zoom < 1.0:
                raise InputError(f"augment `zoom_range` must be in [0, 1) or a pair [lo, hi]. Received: zoom_range={zoom!r}")
            zoom = (1.0 - zoom, 1.0 + zoom)
        object.__setattr__(self, "zoom_range", _range("zoom_range", zoom, 0.01, 10.0))
        object.__setattr__(self, "brightness_range", _range("brightness_range", self.brightness_range, 0.0, 10.0))
        object.__setattr__(self, "contrast_range", _range("contrast_range", self.contrast_range, 0.0, 10.0))
        for name in ("horizontal_flip", "vertical_flip"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"augment `{name}` must be true or false. Received: {name}={getattr(self, name)!r}")
        if self.fill_mode not in FILL_MODES:
            raise InputError(f"augment `fill_mode` must be one of {FILL_MODES}. Received: fill_mode={self.fill_mode!r}")

    @classmethod
    def from_dict(cls, values: dict | None) -> AugmentSpec:
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            hints = [f"`{key}`" + "".join(f" (did you mean `{m}`?)" for m in difflib.get_close_matches(str(key), known, 1))
                     for key in unknown]
            raise InputError(f"unknown augment key {', '.join(hints)}: the keys are {sorted(known)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, text: str) -> AugmentSpec:
        """Parses a YAML (or JSON) mapping; an empty text means no augmentation."""
        try:
            values = yaml.safe_load(text) if text and text.strip() else {}
        except yaml.YAMLError as e:
            raise InputError(f"augment spec is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(values, dict):
            raise InputError(f"augment spec must be a YAML mapping of key: value. Received: {text!r}")
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        for name in ("zoom_range", "brightness_range", "contrast_range"):
            if values[name] is not None:
                values[name] = list(values[name])
        return values

    @property
    def is_identity(self) -> bool:
        return self == AugmentSpec()


# The tutorial's ImageDataGenerator settings, kftune's default.
CLASSIC = AugmentSpec(
    rotation_range=40,
    width_shift_range=0.2,
    height_shift_range=0.2,
    shear_range=0.2,
    zoom_range=0.2,
    horizontal_flip=True,
    fill_mode="nearest",
)
# One line: KFP writes parameter defaults into a YAML comment that breaks on newlines.
CLASSIC_YAML = yaml.safe_dump(CLASSIC.to_dict(), sort_keys=False, default_flow_style=True, width=10_000).strip()


def draw(spec: AugmentSpec, batch_size, seed) -> dict:
    """Draws one set of random parameters per image. ``seed`` is a stateless seed pair."""
    import tensorflow as tf

    # One draw for every parameter at once: in an input pipeline each op costs
    # more than the arithmetic it does, so fewer, larger ops are faster.
    return _parameters(spec, tf.random.stateless_uniform([10, batch_size], tf.cast(seed, tf.int64)))


def _parameters(spec: AugmentSpec, u) -> dict:
    """The parameters of :func:`draw` from its uniform draws ``u`` (10 x images)."""
    zoom = spec.zoom_range
    brightness = spec.brightness_range or (1.0, 1.0)
    contrast = spec.contrast_range or (1.0, 1.0)

    def between(i, lo, hi):
        return lo + (hi - lo) * u[i]

    return {
        "theta": between(0, -spec.rotation_range, spec.rotation_range),
        "tx": between(1, -spec.width_shift_range, spec.width_shift_range),
        "ty": between(2, -spec.height_shift_range, spec.height_shift_range),
        "shear": between(3, -spec.shear_range, spec.shear_range),
        "zx": between(4, *zoom),
        "zy": between(5, *zoom),
        "flip_h": u[6] < (0.5 if spec.horizontal_flip else 0.0),
        "flip_v": u[7] < (0.5 if spec.vertical_flip else 0.0),
        "brightness": between(8, *brightness),
        "contrast": between(9, *contrast),
    }


def affine_matrices(params: dict, height: int, width: int):
    """Output-to-input pixel maps, one 3x3 matrix per image, in (x=column, y=row) order.

    ImageDataGenerator's matrices, composed as it composes them about the image
    centre c: ``rotation @ shift @ shear @ zoom``. Its flips come after the warp,
    which as an output-to-input map is a flip matrix on the right, so they fold
    into the same matrix. ``tx`` and ``ty`` are fractions of the width and height.
    The product is written out rather than multiplied, for speed (see :func:`draw`).
    """
    import tensorflow as tf

    theta = params["theta"] * (math.pi / 180.0)
    shear = params["shear"] * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    # rotation [[cos, -sin], [sin, cos]]; shear [[1, -sin(s)], [0, cos(s)]];
    # zoom diag(zx, zy); flip diag(+-1, +-1).
    a = params["zx"] * tf.where(params["flip_h"], -1.0, 1.0)
    zy = params["zy"] * tf.where(params["flip_v"], -1.0, 1.0)
    b, d = -tf.sin(shear) * zy, tf.cos(shear) * zy
    l00, l01 = cos * a, cos * b - sin * d
    l10, l11 = sin * a, sin * b + cos * d
    # x_in = L (x_out - c) + rotation @ shift + c, with the true centre on both
    # axes (ImageDataGenerator swaps them, which shows on non-square images).
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    sx, sy = params["tx"] * width, params["ty"] * height
    t0 = cos * sx - sin * sy + cx - l00 * cx - l01 * cy
    t1 = sin * sx + cos * sy + cy - l10 * cx - l11 * cy
    zeros, ones = tf.zeros_like(a), tf.ones_like(a)
    return tf.reshape(tf.stack([l00, l01, t0, l10, l11, t1, zeros, zeros, ones], axis=-1), [-1, 3, 3])


def resolve_backend(backend: str, *, input_pipeline: bool = False) -> str:
    """The path that resamples the images: ``opencv`` or ``tf``.

    ``auto`` is TensorFlow's op where a GPU is visible and OpenCV elsewhere. In an
    input pipeline it is always OpenCV: tf.data runs its map functions on the
    host CPU even on a GPU machine, and there OpenCV is the faster path.
    """
    if backend not in BACKENDS:
        raise InputError(f"augment `backend` must be one of {BACKENDS}. Received: backend={backend!r}")
    if backend != "auto":
        return backend
    if input_pipeline:
        return "opencv"
    import tensorflow as tf

    return "tf" if tf.config.list_physical_devices("GPU") else "opencv"


@functools.cache
def _cv2():
    import cv2

    # Callers run one batch per core (tf.data's parallel map); OpenCV's own
    # thread pool on top of that only makes the batches contend for the cores.
    cv2.setNumThreads(1)
    return cv2


# TensorFlow takes an array that a numpy_function returns without copying it only when its data is
# aligned as TensorFlow's own tensors are (EIGEN_MAX_ALIGN_BYTES: 64 with AVX-512); numpy aligns to
# 16 bytes, and the copy of a float32 batch of 32 images at 224 px (19 MB) took 1.5 ms.
_TENSOR_ALIGNMENT = 64


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a _TENSOR_ALIGNMENT boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _TENSOR_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _TENSOR_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _warp_opencv(images: np.ndarray, matrices: np.ndarray, fill_mode: str, cval: float) -> np.ndarray:
    """cv2.warpAffine of each image with its output-to-input matrix, as float32.

    Each image is converted to float32 on its own and warped as float32 straight
    into the batch TensorFlow receives (docs/benchmarks.md, "Augmentation"): with
    OpenCV 5 the float warp costs less than the uint8 one (a third less at
    224 px under the tutorial's rotations and zooms) and does not round, the
    converted image is still in the core's cache when it is warped, and no
    separate cast of the whole batch follows.
    """
    cv2 = _cv2()
    n, height, width, channels = images.shape
    # OpenCV gives single-channel images back without their channel axis.
    shape = (height, width, *([channels] if channels > 1 else []))
    images = images.reshape(n, *shape)
    out = _aligned_empty((n, *shape), np.float32)
    scratch = None if images.dtype == np.float32 else np.empty(shape, np.float32)
    warp, size = cv2.warpAffine, (width, height)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    border, border_value = getattr(cv2, _CV2_BORDERS[fill_mode]), (cval,) * 4
    for image, matrix, warped in zip(images, matrices[:, :2], out, strict=True):
        if scratch is not None:
            np.copyto(scratch, image, casting="unsafe")
            image = scratch
        warp(image, matrix, size, warped, flags, border, border_value)
    return out.reshape(n, height, width, channels)


def _warp_tf_wrap(images, matrices):
    """Bilinear warp with periodic borders, in TensorFlow ops.

    TensorFlow's WRAP fill mode blends the pixels along each seam with the fill
    value instead of with the opposite edge, so wrap samples here.
    """
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float32), tf.range(width, dtype=tf.float32), indexing="ij")
    source = tf.einsum("nij,hwj->nhwi", matrices, tf.stack([xs, ys, tf.ones_like(xs)], axis=-1))
    x0, y0 = tf.floor(source[..., 0]), tf.floor(source[..., 1])
    wx, wy = (source[..., 0] - x0)[..., None], (source[..., 1] - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
    batch = tf.broadcast_to(tf.range(tf.shape(images)[0])[:, None, None], tf.shape(x0))

    def at(y, x):
        return tf.gather_nd(images, tf.stack([batch, tf.math.floormod(y, height), tf.math.floormod(x, width)], -1))

    top = at(y0, x0) * (1.0 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1.0 - wx) + at(y0 + 1, x0 + 1) * wx
    return top * (1.0 - wy) + bottom * wy


def apply(images, params: dict, spec: AugmentSpec, backend: str = "auto"):
    """Applies drawn parameters to a batch of images (N, H, W, C), values 0..255 -> float32.

    Both backends resample with the same matrices, in float32: OpenCV converts
    each uint8 image to float32 before its warp, as TensorFlow's op does, so the
    two agree to float rounding whatever the input's dtype.
    """
    import tensorflow as tf

    backend = resolve_backend(backend)
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.uint8:
        images = tf.cast(images, tf.float32)
    height, width = images.shape[1], images.shape[2]
    matrices = affine_matrices(params, height, width)
    if backend == "opencv":
        warped = tf.numpy_function(
            functools.partial(_warp_opencv, fill_mode=spec.fill_mode, cval=float(spec.cval)),
            [images, matrices], tf.float32, stateful=False,
        )
        images = tf.ensure_shape(warped, images.shape)
    elif spec.fill_mode == "wrap":
        images = _warp_tf_wrap(tf.cast(images, tf.float32), matrices)
    else:
        images = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(images, tf.float32),
            transforms=tf.reshape(matrices, [-1, 9])[:, :8],
            output_shape=tf.constant([height, width], tf.int32),
            fill_value=float(spec.cval),
            interpolation="BILINEAR",
            fill_mode=spec.fill_mode.upper(),
        )
    if spec.brightness_range is not None:
        images = images * params["brightness"][:, None, None, None]
    if spec.contrast_range is not None:
        # One mean over all channels, as PIL's ImageEnhance.Contrast: a
        # per-channel mean would also shift the colours.
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * params["contrast"][:, None, None, None] + mean
    if spec.brightness_range is None and spec.contrast_range is None:
        # Bilinear weights are convex and cval is in 0..255, so a warp alone
        # stays in range; skipping the clip saves a pass over every pixel.
        return images
    return tf.clip_by_value(images, 0.0, 255.0)


def augment_batch(images, spec: AugmentSpec, seed, backend: str = "auto"):
    """Draws and applies random transforms to one batch."""
    import tensorflow as tf

    return apply(images, draw(spec, tf.shape(images)[0], seed), spec, backend)


SHUFFLE_BUFFER_BYTES = 128 * 2**20
SHUFFLE_BUFFER_MAX = 10_000


def shuffle_buffer(data) -> int:
    """How many images to shuffle among: as many as fit in SHUFFLE_BUFFER_BYTES, at most 10,000.

    A fixed count would cost 30 MiB at 32x32 but 1.5 GiB at 224x224 RGB; the budget
    holds at every size (891 images at 224x224 RGB, 42 at 1024x1024). A small buffer
    still mixes the classes, because ingest writes every split in a seeded random order.
    """
    import numpy as np

    image_bytes = int(np.prod(data.element_spec[0].shape)) * data.element_spec[0].dtype.size
    return int(max(1, min(SHUFFLE_BUFFER_MAX, SHUFFLE_BUFFER_BYTES // max(image_bytes, 1))))


# Online augmentation augments this many bytes of (float32) output per call of its map function at most,
# and at most GROUP_MAX batches: each call costs a fixed 0.2-0.3 ms of tf.data and Python work (the map
# function, numpy_function's hand-off, the draw), as much as warping a batch of 32 images at 64 px, so small
# images are augmented several batches at a time (8 at 64 px: 27k -> 44k img/s on 2 cores) and split after.
# At 224 px one batch of 32 is 19 MB, so each call keeps one batch: splitting large batches copies them.
GROUP_BYTES = 12 * 2**20
GROUP_MAX = 8


def batches_per_call(image_shape, batch_size: int) -> int:
    """How many batches of ``batch_size`` images of ``image_shape`` one call of the augmentation map takes."""
    batch_bytes = batch_size * int(np.prod(image_shape)) * 4
    return int(max(1, min(GROUP_MAX, GROUP_BYTES // max(batch_bytes, 1))))


def _augment_batches(images, seeds, spec: AugmentSpec, batch_size: int, group: int, backend: str):
    """Augments up to ``group`` consecutive batches joined into one, each drawing as :func:`augment_batch` would.

    Batch ``j`` (the ``batch_size`` images from ``j * batch_size``; the last one may be short) draws with
    the seed pair ``seeds[2j : 2j + 2]``, so its transforms are the same whatever the grouping.
    """
    import tensorflow as tf

    count = tf.shape(images)[0]
    seeds = tf.cast(seeds, tf.int64)
    u = tf.concat([tf.random.stateless_uniform([10, tf.clip_by_value(count - j * batch_size, 0, batch_size)],
                                               seeds[2 * j : 2 * j + 2]) for j in range(group)], axis=1)
    return apply(images, _parameters(spec, u), spec, backend)


def training_batches(data, spec: AugmentSpec | None, batch_size: int, seed: int, *, backend: str = "auto"):
    """Shuffled, batched, augmented training data: the online mode.

    Each epoch draws new transforms, and the same seed repeats the same epochs.
    Each batch draws with its own pair from a seeded stream of seeds. Small
    images are augmented :func:`batches_per_call` batches per call and split
    into batches again: the draws are each batch's own, and the matrices are
    computed over the group, which can move a pixel value by float rounding
    (a thousandth; none when the batch size is a multiple of 8, the SIMD width).
    """
    import tensorflow as tf

    data = data.shuffle(shuffle_buffer(data), seed=seed, reshuffle_each_iteration=True)
    if spec is None or spec.is_identity:
        return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    backend = resolve_backend(backend, input_pipeline=True)
    group = batches_per_call(data.element_spec[0].shape, batch_size)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2 * group)
    data = tf.data.Dataset.zip((data.batch(batch_size * group), seeds)).map(
        lambda xy, s: (_augment_batches(xy[0], s, spec, batch_size, group, backend), xy[1]),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if group > 1:
        data = data.rebatch(batch_size)
    return data.prefetch(tf.data.AUTOTUNE)


def materialize(
    dataset_dir: str | Path,
    output_dir: str | Path,
    spec: AugmentSpec,
    *,
    copies: int,
    seed: int = 0,
    batch_size: int = 256,
    backend: str = "auto",
) -> dataset.DatasetInfo:
    """Writes the dataset to ``output_dir`` with its training split augmented.

    ``copies == 0`` is the online mode: the data is copied unchanged and the spec
    is recorded in ``info.json``, so the search and fine-tune steps augment
    training batches as they read them. ``copies > 0`` is the offline mode: the
    training split holds every original image and ``copies`` augmented variants
    of it, and nothing is augmented later. An empty spec copies the data as it
    is, whatever ``copies`` says. Validation and test data are never augmented.
    """
    import tensorflow as tf

    if copies < 0:
        raise InputError(f"`copies` must be 0 (augment online) or more. Received: copies={copies}")
    if spec.is_identity:
        copies = 0  # copies of unaugmented images would only repeat the originals
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    info = dataset.DatasetInfo.load(dataset_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    copy_splits = [s for s in info.splits if copies == 0 or s != "train"]
    for path in sorted(dataset_dir.glob("*.tfrecord")):
        if path.name.split("-")[0] in copy_splits:
            shutil.copy2(path, output_dir / path.name)
    if copies == 0:
        info.augment = None if spec.is_identity else spec.to_dict()
    else:
        backend = resolve_backend(backend, input_pipeline=True)

        def variants(index, images, labels):
            out = [augment_batch(images, spec, tf.stack([tf.constant(seed, tf.int64), index * copies + c]), backend)
                   for c in range(copies)]
            return images, labels, tf.cast(tf.round(tf.stack(out)), tf.uint8)

        batches = dataset.load_split(dataset_dir, "train").batch(batch_size).enumerate()
        batches = batches.map(lambda i, xy: variants(i, *xy), num_parallel_calls=tf.data.AUTOTUNE)
        writer = dataset.ShardWriter(output_dir, "train", 4096)
        for images, labels, augmented in batches.as_numpy_iterator():
            for batch in (images, *augmented):
                for image, label in zip(batch, labels, strict=True):
                    writer.write(image, int(label))
        writer.close()
        info.splits = {**info.splits, "train": writer.count}
        info.augment = None
    info.fingerprint = dataset.fingerprint(output_dir)
    info.save(output_dir)
    return info


def preview_grid(dataset_dir: str | Path, spec: AugmentSpec, *, images: int = 6, variants: int = 5, seed: int = 0,
                 backend: str = "auto"):
    """(originals, variants) uint8 arrays: a few training images and their augmented variants."""
    import tensorflow as tf

    originals, _ = next(iter(dataset.load_split(dataset_dir, "train").batch(images).as_numpy_iterator()))
    rows = [
        tf.cast(tf.round(augment_batch(originals, spec, tf.constant([seed, 10_000 + v]), backend)), tf.uint8).numpy()
        for v in range(variants)
    ]
    return originals, np.stack(rows, axis=1)


def preview_html(dataset_dir: str | Path, spec: AugmentSpec, *, mode: str, spec_text: str, seed: int = 0) -> str:
    """An HTML page for the Kubeflow UI: a labelled grid, one row per sample image: the original
    (framed), then each augmented variant; the spec above it, wrapped to the page."""
    import html

    from kftune import report

    originals, variants = preview_grid(dataset_dir, spec, seed=seed)
    plt = report.pyplot()
    rows, cols = variants.shape[0], variants.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.15 * cols + 0.9, 1.15 * rows + 0.3), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            image = originals[r] if c == 0 else variants[r, c - 1]
            ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                # The originals framed, the variants not: the eye finds the reference column.
                spine.set_visible(c == 0)
                spine.set_color("#1a73e8")
                spine.set_linewidth(2)
            if r == 0:
                ax.set_title("original" if c == 0 else f"variant {c}", fontsize=10)
        axes[r][0].set_ylabel(f"sample {r + 1}", fontsize=10, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.08, hspace=0.08)
    body = (f"<p>Mode: <b>{html.escape(mode)}</b>. Each row: a training image, then {cols - 1} draws of the "
            f"augmentation. Spec:</p><pre>{html.escape(spec_text or '(none)')}</pre>" + report.figure(fig))
    return report.page("Augmentation preview", body)


# Milder settings that suit the bundled digits (a mirrored 2 is not a 2): the pipeline's default.
MILD = AugmentSpec(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.1, fill_mode="nearest")
MILD_YAML = yaml.safe_dump(MILD.to_dict(), sort_keys=False, default_flow_style=True, width=10_000).strip()

# At most this many augmented copies of the training split: each is a full copy on disk.
MAX_COPIES = 50


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """How the augment step augments the training split.

    Attributes:
        augment_spec: YAML mapping with ImageDataGenerator's names and meanings,
            e.g. {rotation_range: 40, width_shift_range: 0.2, height_shift_range: 0.2,
            shear_range: 0.2, zoom_range: 0.2, horizontal_flip: true, fill_mode: nearest};
            also vertical_flip, brightness_range: [lo, hi], contrast_range: [lo, hi]
            and cval. Empty: no augmentation.
        augment_copies: 0 augments online (each training batch as it is read); K > 0
            writes K augmented copies of every training image (offline). Validation
            and test images are never augmented.
        seed: Seeds the transforms: the same seed gives the same images.
    """

    augment_spec: str = MILD_YAML
    augment_copies: int = 0
    seed: int = 0

    def __post_init__(self):
        check_whole_numbers(self, {"augment_copies": 0, "seed": 0})
        if self.augment_copies > MAX_COPIES:
            raise InputError(f"`augment_copies` must be at most {MAX_COPIES} (each copy is the whole training split "
                             f"again on disk); use online augmentation (0) for more variety. "
                             f"Received: augment_copies={self.augment_copies}")
        AugmentSpec.from_yaml(self.augment_spec)

    @property
    def spec(self) -> AugmentSpec:
        return AugmentSpec.from_yaml(self.augment_spec)
