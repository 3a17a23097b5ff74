"""Photo-like data and backbone weights made in code, for runs and benchmarks without a network.

``photos``: a folder of class subfolders of JPEG and PNG images, cut from the
two photographs scikit-learn ships (``sklearn.datasets.load_sample_images``: a
pagoda above a lake, and a dahlia). Each class is one part of a photograph
(the pagoda, the sky, the lake, the trees, the flower, the foliage behind it);
each image is a crop of that part at its own position, scale and angle, mirrored
or not, with its own brightness, contrast, colour and sensor noise, resized to
``size``. Classes therefore differ in content and texture while their images
vary as real photos of one thing do, and some crops reach into a neighbouring
part, as real labels are never perfectly clean. The same arguments give the same
bytes.

``weights``: a keras.applications base (``include_top=False``) saved with
``save_weights``, for ``weights=<file>``. Its kernels are Keras' seeded random
initialisation, and its BatchNormalization statistics are measured on photos
made as above with another seed, so that every layer's activations are
normalised as in a trained network: features that carry information about
images, though not ImageNet's. It exercises a backbone at its real size and
cost; accuracy is not what ImageNet weights would give.

Command line::

    python -m kftune.fixtures photos data/photos --images 300 --size 224
    python -m kftune.fixtures weights data/mobilenet_v2_035_224.weights.h5 --backbone mobilenet_v2_035 --size 224
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

# Each class: (photograph, (left, top, right, bottom)) of the region crops are centred in,
# in the 640x427 pixels of scikit-learn's china.jpg and flower.jpg.
CLASSES: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "pagoda": ("china.jpg", (90, 60, 330, 380)),
    "sky": ("china.jpg", (380, 10, 630, 150)),
    "lake": ("china.jpg", (350, 210, 540, 280)),
    "trees": ("china.jpg", (420, 300, 630, 420)),
    "dahlia": ("flower.jpg", (200, 100, 440, 330)),
    "foliage": ("flower.jpg", (10, 10, 170, 300)),
}


def _photographs() -> dict[str, object]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    return {Path(name).name: Image.fromarray(image) for name, image in zip(sample.filenames, sample.images, strict=True)}


def _crop(photo, region, size: int, rng: np.random.Generator):
    """One photo-like image of a region: a random crop, angle, mirror, tone and noise."""
    from PIL import Image, ImageEnhance

    left, top, right, bottom = region
    cx, cy = rng.uniform(left, right), rng.uniform(top, bottom)
    side = rng.uniform(0.45, 1.0) * max(64, min(right - left, bottom - top))
    angle = rng.uniform(-15, 15)
    # Crop a larger square first, so that rotating it leaves no empty corners in the final crop,
    # and keep that square inside the photograph.
    half = side * 0.75
    cx, cy = min(max(cx, half), photo.width - half), min(max(cy, half), photo.height - half)
    box = tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    patch = photo.crop(box).rotate(angle, resample=Image.BILINEAR)
    inner = (half - side / 2, half - side / 2, half + side / 2, half + side / 2)
    patch = patch.crop(tuple(int(round(v)) for v in inner)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        patch = enhancer(patch).enhance(rng.uniform(0.75, 1.25))
    pixels = np.asarray(patch, np.float32) + rng.normal(0.0, 4.0, (size, size, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def photo_arrays(images: int, *, size: int = 224, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``images`` photo-like images (uint8, N x size x size x 3), classes in turn, and their labels."""
    photos, names = _photographs(), list(CLASSES)
    out = np.zeros((images, size, size, 3), np.uint8)
    labels = np.arange(images) % len(names)
    for i, label in enumerate(labels):
        photo, region = CLASSES[names[label]]
        out[i] = np.asarray(_crop(photos[photo], region, size, np.random.default_rng([seed, int(label), i])))
    return out, labels


def make_photos(folder: str | Path, images: int, *, size: int = 224, seed: int = 0) -> dict[str, int]:
    """Writes ``images`` photo-like images (spread evenly over the classes) to ``folder/<class>/``.

    Three in four are JPEG (quality 90), one in four PNG, as a folder of photos
    mixes formats. Returns the number written per class. Refuses a folder that
    already holds images, so that nothing there is replaced.
    """
    from kftune.errors import InputError

    folder = Path(folder)
    if images < 2 * len(CLASSES):
        raise InputError(f"`images` must be at least {2 * len(CLASSES)} (two per class). Received: {images}")
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"`{folder}` is not empty: give a new folder, so that no file of yours is replaced.")
    photos, names = _photographs(), list(CLASSES)
    counts = dict.fromkeys(names, 0)
    for i in range(images):
        name = names[i % len(names)]
        photo, region = CLASSES[name]
        image = _crop(photos[photo], region, size, np.random.default_rng([seed, i % len(names), i]))
        fmt, suffix = ("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg")
        buffer = io.BytesIO()
        image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{i:06d}.{suffix}").write_bytes(buffer.getvalue())
        counts[name] += 1
    return counts


def make_backbone_weights(path: str | Path, backbone: str, *, size: int = 224, seed: int = 0,
                          calibration_images: int = 64) -> Path:
    """Saves a seeded, randomly initialised ``backbone`` base whose BatchNorm statistics are measured.

    The statistics come from one pass in training mode over ``calibration_images``
    photo-like images (seed ``seed + 1000``, so none of them is an image of a
    dataset made with a small seed), with momentum 0, so that each layer's
    moving mean and variance are those of its inputs. The file loads with
    ``weights=<path>`` for the same backbone and input size.
    """
    import tensorflow as tf

    from kftune import models

    spec = models.BACKBONES[backbone]
    tf.keras.utils.set_random_seed(seed)
    k = models.keras()
    base = getattr(k.applications, spec.constructor)(
        include_top=False, weights=None, input_shape=(size, size, 3), **({"alpha": spec.alpha} if spec.alpha else {}))
    norms = [layer for layer in base.layers if isinstance(layer, k.layers.BatchNormalization)]
    if norms:
        images, _ = photo_arrays(calibration_images, size=size, seed=seed + 1000)
        scaled = models._preprocess_layer(spec.preprocessing)
        x = tf.constant(images, tf.float32)
        x = scaled(x) if scaled is not None else x
        for layer in norms:
            layer.momentum = 0.0
        base(x, training=True)
        for layer in norms:
            layer.momentum = 0.99
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    from kftune import models

    parser = argparse.ArgumentParser(prog="python -m kftune.fixtures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    photos = sub.add_parser("photos", help="a folder of class subfolders of photo-like images")
    photos.add_argument("folder")
    photos.add_argument("--images", type=int, default=300)
    photos.add_argument("--size", type=int, default=224)
    photos.add_argument("--seed", type=int, default=0)
    weights = sub.add_parser("weights", help="a backbone's weights file (random kernels, measured BatchNorm statistics)")
    weights.add_argument("path")
    weights.add_argument("--backbone", default="mobilenet_v2_035", choices=sorted(models.BACKBONES))
    weights.add_argument("--size", type=int, default=224)
    weights.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from kftune.errors import InputError

    try:
        return _run(args)
    except InputError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _run(args) -> int:
    if args.what == "photos":
        counts = make_photos(args.folder, args.images, size=args.size, seed=args.seed)
        print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.folder}: {counts}")
    else:
        print(f"wrote {make_backbone_weights(args.path, args.backbone, size=args.size, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
