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
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import yaml

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset
from kftune.errors import InputError

FILL_MODES = ("nearest", "reflect", "constant", "wrap")


def _range(name: str, value, low: float, high: float) -> tuple[float, float] | None:
    """Validates a [min, max] factor range such as brightness_range."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise InputError(f"augment `{name}` must be a pair [min, max]. Received: {name}={value!r}")
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
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown augment key(s) {unknown}: the keys are {sorted(known)}.")
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

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=9)

    def uniform(i, lo, hi):
        return tf.random.stateless_uniform([batch_size], seeds[i], lo, hi)

    zoom = spec.zoom_range
    return {
        "theta": uniform(0, -spec.rotation_range, spec.rotation_range),
        "tx": uniform(1, -spec.width_shift_range, spec.width_shift_range),
        "ty": uniform(2, -spec.height_shift_range, spec.height_shift_range),
        "shear": uniform(3, -spec.shear_range, spec.shear_range),
        "zx": uniform(4, zoom[0], zoom[1]),
        "zy": uniform(5, zoom[0], zoom[1]),
        "flip_h": uniform(6, 0.0, 1.0) < (0.5 if spec.horizontal_flip else 0.0),
        "flip_v": uniform(7, 0.0, 1.0) < (0.5 if spec.vertical_flip else 0.0),
        "brightness": uniform(8, *(spec.brightness_range or (1.0, 1.0))),
        "contrast": tf.random.stateless_uniform(
            [batch_size], seeds[8][::-1], *(spec.contrast_range or (1.0, 1.0))
        ),
    }


def affine_matrices(params: dict, height: int, width: int):
    """Output-to-input pixel maps, one 3x3 matrix per image, in (x=column, y=row) order.

    Composed as ImageDataGenerator composes them: rotation, shift, shear, zoom,
    about the image centre; the flips are folded into the same matrix.
    """
    import tensorflow as tf

    n = tf.shape(params["theta"])[0]
    zeros, ones = tf.zeros([n]), tf.ones([n])

    def mat(rows):
        return tf.reshape(tf.stack([tf.stack(r, axis=-1) for r in rows], axis=1), [n, 3, 3])

    theta = params["theta"] * (math.pi / 180.0)
    shear = params["shear"] * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    rotation = mat([[cos, sin, zeros], [-sin, cos, zeros], [zeros, zeros, ones]])
    shift = mat([[ones, zeros, params["tx"] * width], [zeros, ones, params["ty"] * height], [zeros, zeros, ones]])
    shearing = mat([[ones, zeros, zeros], [-tf.sin(shear), tf.cos(shear), zeros], [zeros, zeros, ones]])
    zoom = mat([[params["zx"], zeros, zeros], [zeros, params["zy"], zeros], [zeros, zeros, ones]])
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    to_center = tf.constant([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    from_center = tf.constant([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    fx = tf.where(params["flip_h"], -ones, ones)
    fy = tf.where(params["flip_v"], -ones, ones)
    flip = mat([[fx, zeros, zeros], [zeros, fy, zeros], [zeros, zeros, ones]])
    return to_center @ rotation @ shift @ shearing @ zoom @ flip @ from_center


def apply(images, params: dict, spec: AugmentSpec):
    """Applies drawn parameters to a batch of images (N, H, W, C), values 0..255 -> float32."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    height, width = images.shape[1], images.shape[2]
    matrices = affine_matrices(params, height, width)
    flat = tf.reshape(matrices, [-1, 9])[:, :8] / tf.reshape(matrices, [-1, 9])[:, 8:9]
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=flat,
        output_shape=tf.constant([height, width], tf.int32),
        fill_value=float(spec.cval),
        interpolation="BILINEAR",
        fill_mode=spec.fill_mode.upper(),
    )
    if spec.brightness_range is not None:
        images = images * params["brightness"][:, None, None, None]
    if spec.contrast_range is not None:
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = (images - mean) * params["contrast"][:, None, None, None] + mean
    return tf.clip_by_value(images, 0.0, 255.0)


def augment_batch(images, spec: AugmentSpec, seed):
    """Draws and applies random transforms to one batch."""
    import tensorflow as tf

    return apply(images, draw(spec, tf.shape(images)[0], seed), spec)


def training_batches(data, spec: AugmentSpec | None, batch_size: int, seed: int):
    """Shuffled, batched, augmented training data: the online mode.

    Each epoch draws new transforms, and the same seed repeats the same epochs.
    """
    import tensorflow as tf

    data = data.shuffle(10_000, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    if spec is not None and not spec.is_identity:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        data = tf.data.Dataset.zip((data, seeds)).map(
            lambda xy, s: (augment_batch(xy[0], spec, s), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return data.prefetch(tf.data.AUTOTUNE)


def materialize(
    dataset_dir: str | Path,
    output_dir: str | Path,
    spec: AugmentSpec,
    *,
    copies: int,
    seed: int = 0,
    batch_size: int = 256,
) -> dataset.DatasetInfo:
    """Writes the dataset to ``output_dir`` with its training split augmented.

    ``copies == 0`` is the online mode: the data is copied unchanged and the spec
    is recorded in ``info.json``, so the search and fine-tune steps augment
    training batches as they read them. ``copies > 0`` is the offline mode: the
    training split holds every original image and ``copies`` augmented variants
    of it, and nothing is augmented later. Validation and test data are never
    augmented.
    """
    import tensorflow as tf

    if copies < 0:
        raise InputError(f"`copies` must be 0 (augment online) or more. Received: copies={copies}")
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
        writer = dataset.ShardWriter(output_dir, "train", 4096)
        originals = dataset.load_split(dataset_dir, "train").batch(batch_size)
        for index, (images, labels) in enumerate(originals):
            for image, label in zip(images.numpy(), labels.numpy(), strict=True):
                writer.write(image, int(label))
            for copy in range(copies):
                augmented = augment_batch(images, spec, tf.constant([seed, index * copies + copy]))
                augmented = tf.cast(tf.round(augmented), tf.uint8).numpy()
                for image, label in zip(augmented, labels.numpy(), strict=True):
                    writer.write(image, int(label))
        writer.close()
        info.splits = {**info.splits, "train": writer.count}
        info.augment = None
    info.fingerprint = dataset.fingerprint(output_dir)
    info.save(output_dir)
    return info


def preview_grid(dataset_dir: str | Path, spec: AugmentSpec, *, images: int = 6, variants: int = 5, seed: int = 0):
    """(originals, variants) uint8 arrays: a few training images and their augmented variants."""
    import numpy as np
    import tensorflow as tf

    originals, _ = next(iter(dataset.load_split(dataset_dir, "train").batch(images).as_numpy_iterator()))
    rows = [
        tf.cast(tf.round(augment_batch(originals, spec, tf.constant([seed, 10_000 + v]))), tf.uint8).numpy()
        for v in range(variants)
    ]
    return originals, np.stack(rows, axis=1)

# Milder settings that suit the bundled digits (a mirrored 2 is not a 2): the pipeline's default.
MILD = AugmentSpec(rotation_range=10, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.1, fill_mode="nearest")
MILD_YAML = yaml.safe_dump(MILD.to_dict(), sort_keys=False, default_flow_style=True, width=10_000).strip()
