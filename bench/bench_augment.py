"""Augmentation benchmark: kftune's input pipeline against ImageDataGenerator.flow.

Prints, side by side, the images per second of ImageDataGenerator.flow and of
kftune's online augmentation (``augment.training_batches``, the pipeline that
search, fine-tune and prune read) with its OpenCV path and with TensorFlow's
op, at 64x64 and 224x224: the same photos, the same parameters (the tutorial's
``ImageDataGenerator(rotation_range=40, width_shift_range=0.2, ...)``), the same
batch size, each shuffled, augmented and delivered as float32 numpy batches. Where
a GPU is visible it also times TensorFlow's op on batches already on the GPU.

    .venv/bin/python bench/bench_augment.py [--batch-size 32] [--seconds 3] [--rounds 3] [--quick]

Check ``uptime`` first: other work on the machine lowers every number, and the
ImageDataGenerator baseline (one core) less than kftune (all cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import augment, report

SIZES = (64, 224)


def photos(size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` real RGB photos (random crops of scikit-learn's two sample images), uint8."""
    import tensorflow as tf
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    sources = load_sample_images().images
    crops = []
    for i in range(count):
        image = sources[i % len(sources)]
        side = int(rng.integers(200, min(image.shape[:2]) + 1))
        top, left = (int(rng.integers(0, image.shape[k] - side + 1)) for k in (0, 1))
        crops.append(image[top : top + side, left : left + side])
    resized = [tf.image.resize(c, (size, size), antialias=True).numpy() for c in crops]
    return np.clip(np.round(resized), 0, 255).astype(np.uint8)


def images_per_second(batches, batch_size: int, seconds: float) -> float:
    """Pulls batches for about ``seconds`` after two warm-up batches."""
    iterator = iter(batches)
    for _ in range(2):
        next(iterator)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = next(iterator)
        count += len(batch[0]) if isinstance(batch, tuple) else len(batch)
    rate = count / (time.perf_counter() - started)
    del iterator  # stops tf.data's workers before the next measurement
    return rate


def image_data_generator(images: np.ndarray, labels: np.ndarray, batch_size: int):
    from tf_keras.preprocessing.image import ImageDataGenerator

    spec = augment.CLASSIC
    generator = ImageDataGenerator(
        rotation_range=spec.rotation_range, width_shift_range=spec.width_shift_range,
        height_shift_range=spec.height_shift_range, shear_range=spec.shear_range,
        zoom_range=list(spec.zoom_range), horizontal_flip=spec.horizontal_flip, fill_mode=spec.fill_mode,
    )
    return generator.flow(images, labels, batch_size=batch_size, shuffle=True, seed=0)


def kftune_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, backend: str):
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((images, labels))
    batches = augment.training_batches(data, augment.CLASSIC, batch_size, seed=0, backend=backend)
    return batches.repeat().as_numpy_iterator()


def device_batches(images: np.ndarray, batch_size: int, device: str):
    """TensorFlow's op on batches that already sit on ``device``: augmentation on the accelerator."""
    import tensorflow as tf

    with tf.device(device):
        batch = tf.constant(images[:batch_size])
        step = tf.function(lambda x, s: augment.augment_batch(x, augment.CLASSIC, s, backend="tf"))
        seed = 0
        while True:
            seed += 1
            out = step(batch, tf.constant([0, seed], tf.int64))
            _ = out[0, 0, 0, 0].numpy()  # waits for the device
            yield out


def compare(size: int, count: int, batch_size: int, seconds: float, rounds: int, gpu: bool) -> list:
    """One table row: images per second of each path at ``size``, and each ratio to flow's."""
    images = photos(size, count)
    labels = np.arange(len(images)) % 10
    paths = {
        "flow": lambda: image_data_generator(images, labels, batch_size),
        "opencv": lambda: kftune_batches(images, labels, batch_size, "opencv"),
        "tf": lambda: kftune_batches(images, labels, batch_size, "tf"),
    }
    if gpu:
        paths["gpu"] = lambda: device_batches(images, batch_size, "/GPU:0")
    # Rounds take turns, and each path keeps its best: on a shared machine a
    # burst of someone else's work then lowers one round, not one path.
    best = dict.fromkeys(paths, 0.0)
    for _ in range(rounds):
        for name, make in paths.items():
            best[name] = max(best[name], images_per_second(make(), batch_size, seconds))
    row = [f"{size}x{size}", f"{best['flow']:,.0f}"]
    for name in list(paths)[1:]:
        row += [f"{best[name]:,.0f}", f"{best[name] / best['flow']:.1f}x"]
    return row


def main() -> int:
    import cv2
    import tensorflow as tf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every path (flow's default: 32)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per path; the best counts")
    parser.add_argument("--images", type=int, default=512, help="distinct images per size")
    parser.add_argument("--quick", action="store_true", help="short measurements, to check the script runs")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else args.seconds
    if args.quick:
        args.rounds = 1
    gpus = tf.config.list_physical_devices("GPU")
    print(f"cores: {os.cpu_count()}, load average: {', '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"TensorFlow {tf.__version__}, OpenCV {cv2.__version__}; batch size {args.batch_size}; "
          f"GPU: {gpus[0].name if gpus else 'none visible'}", flush=True)
    rows = []
    for size in SIZES:
        rows.append(compare(size, args.images, args.batch_size, seconds, args.rounds, bool(gpus)))
        print(f"{size}x{size} done", flush=True)
    headers = ["image size", "ImageDataGenerator.flow img/s", "kftune OpenCV img/s", "ratio", "kftune TF op img/s",
               "ratio"]
    if gpus:
        headers += ["kftune TF op on GPU img/s", "ratio"]
    print(report.markdown_table(headers, rows))
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
