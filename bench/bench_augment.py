"""Augmentation benchmark: kftune's input pipeline against ImageDataGenerator.flow.

Images per second of ImageDataGenerator.flow and of kftune's online augmentation
(``augment.training_batches``, the pipeline that search, fine-tune and prune
read) at 64x64 and 224x224: the same photos, the same parameters (the tutorial's
``ImageDataGenerator(rotation_range=40, width_shift_range=0.2, ...)``), the same
batch size, each shuffled, augmented and delivered as float32 batches. kftune's
OpenCV path is read two ways: as numpy batches in Python, as ``flow`` delivers
them (the target's measure), and inside a ``tf.function``, as ``model.fit``
reads a tf.data pipeline. TensorFlow's op (the GPU path) is timed on the CPU
too, and where a GPU is visible on batches already on the GPU.

Every path is measured ``--repeats`` times, taking turns (one round times each
path once, the order rotating from round to round, so a burst of someone else's
work lowers one round, not one path; bench/timing.py);
each measurement starts a fresh iterator and drops its warm-up (the first
batches and a quarter second). Each figure is the median over the rounds with
the minimum and maximum beside it; a ratio is each round's rate over that
round's ``flow`` rate. Target (issue 26): kftune's OpenCV path, as numpy
batches, at least 25x ``flow`` at both sizes, judged on the median ratio; the
script exits 1 when it is missed.

    .venv/bin/python bench/bench_augment.py [--batch-size 32] [--seconds 2] [--repeats 5] [--quick]

Check ``uptime`` first: other work on the machine lowers every number, and the
ImageDataGenerator baseline (one core) less than kftune (all cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import timing

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import augment, report

SIZES = (64, 224)
TARGET = 25.0
# Dropped from every measurement: the first batches (tracing, tf.data's threads starting,
# the prefetch buffer filling) and this long after them.
WARMUP_BATCHES = 3
WARMUP_SECONDS = 0.25


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


def images_per_second(batches: Iterator, seconds: float) -> float:
    """Pulls batches (each yields its image count) for about ``seconds`` after the warm-up."""
    for _ in range(WARMUP_BATCHES):
        next(batches)
    warm_until = time.perf_counter() + WARMUP_SECONDS
    while time.perf_counter() < warm_until:
        next(batches)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        count += next(batches)
    return count / (time.perf_counter() - started)


def image_data_generator(images: np.ndarray, labels: np.ndarray, batch_size: int) -> Iterator[int]:
    from tf_keras.preprocessing.image import ImageDataGenerator

    spec = augment.CLASSIC
    generator = ImageDataGenerator(
        rotation_range=spec.rotation_range, width_shift_range=spec.width_shift_range,
        height_shift_range=spec.height_shift_range, shear_range=spec.shear_range,
        zoom_range=list(spec.zoom_range), horizontal_flip=spec.horizontal_flip, fill_mode=spec.fill_mode,
    )
    for x, _ in generator.flow(images, labels, batch_size=batch_size, shuffle=True, seed=0):
        yield len(x)


def kftune_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, backend: str):
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((images, labels))
    return augment.training_batches(data, augment.CLASSIC, batch_size, seed=0, backend=backend).repeat()


def numpy_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, backend: str) -> Iterator[int]:
    """kftune's pipeline delivering numpy batches to Python, as flow does."""
    for x, _ in kftune_dataset(images, labels, batch_size, backend).as_numpy_iterator():
        yield len(x)


# Batches one tf.function call pulls: enough that its own call costs nothing per batch.
IN_GRAPH_PULL = 16


def in_graph_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, backend: str) -> Iterator[int]:
    """kftune's pipeline read inside a tf.function, as model.fit's training step reads it."""
    import tensorflow as tf

    iterator = iter(kftune_dataset(images, labels, batch_size, backend))

    @tf.function
    def pull(iterator):
        count, touched = tf.constant(0), tf.constant(0.0)
        for _ in tf.range(IN_GRAPH_PULL):
            x, _ = next(iterator)
            count += tf.shape(x)[0]
            touched += x[0, 0, 0, 0]  # the batch must exist, as a training step's input does
        return count, touched

    while True:
        count, _ = pull(iterator)
        yield int(count)


def device_batches(images: np.ndarray, batch_size: int, device: str) -> Iterator[int]:
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
            yield batch_size


def compare(size: int, count: int, batch_size: int, seconds: float, repeats: int, gpu: bool,
            progress: Callable[[str], None]) -> dict[str, list[float]]:
    """Images per second of every path at ``size``, one list per path, one entry per round."""
    images = photos(size, count)
    labels = np.arange(len(images)) % 10
    paths: dict[str, Callable[[], Iterator[int]]] = {
        "flow": lambda: image_data_generator(images, labels, batch_size),
        "opencv": lambda: numpy_batches(images, labels, batch_size, "opencv"),
        "opencv in-graph": lambda: in_graph_batches(images, labels, batch_size, "opencv"),
        "tf": lambda: numpy_batches(images, labels, batch_size, "tf"),
    }
    if gpu:
        paths["gpu"] = lambda: device_batches(images, batch_size, "/GPU:0")
    def measured(make: Callable[[], Iterator[int]]) -> float:
        batches = make()
        rate = images_per_second(batches, seconds)
        batches.close()  # stops tf.data's workers before the next measurement
        return rate

    # Each measurement drops its own warm-up (a fresh iterator each time), so no warm-up round.
    return timing.interleaved({name: (lambda make=make: measured(make)) for name, make in paths.items()}, repeats,
                              warmup=False, progress=lambda line: progress(f"{size}x{size} {line}"), fmt="{:,.0f}")


LABELS = {
    "flow": "ImageDataGenerator.flow, numpy batches (1 thread)",
    "opencv": "kftune OpenCV, numpy batches",
    "opencv in-graph": "kftune OpenCV, read in a tf.function (as model.fit)",
    "tf": "kftune TF op on the CPU, numpy batches",
    "gpu": "kftune TF op on batches on the GPU",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    import cv2
    import tensorflow as tf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of every path (flow's default: 32)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement, after its warm-up")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each figure is their median [min-max]")
    parser.add_argument("--images", type=int, default=512, help="distinct images per size")
    parser.add_argument("--quick", action="store_true",
                        help="one short round on few images, to check the script runs; targets not judged")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeats, args.images = 0.3, 1, 64
    gpus = tf.config.list_physical_devices("GPU")
    augment._cv2()  # sets OpenCV's threads as the pipeline runs them
    print(f"{datetime.date.today().isoformat()}; {os.cpu_count()} cores, {cpu_model()}; "
          f"load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}", flush=True)
    print(f"Python {platform.python_version()}, TensorFlow {tf.__version__}, OpenCV {cv2.__version__}, "
          f"numpy {np.__version__}; batch size {args.batch_size}; {args.repeats} rounds of {args.seconds:g} s per path; "
          f"GPU: {gpus[0].name if gpus else 'none visible'}", flush=True)
    print(f"threads: flow 1 (the Python generator); kftune: tf.data's parallel map (AUTOTUNE) over "
          f"{os.cpu_count()} cores, OpenCV {cv2.getNumThreads()} per map call, TensorFlow's intra-op pool "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}", flush=True)
    results = {size: compare(size, args.images, args.batch_size, args.seconds, args.repeats, bool(gpus),
                             lambda line: print(line, flush=True)) for size in SIZES}
    rows, missed = [], []
    for size, rates in results.items():
        for name, values in rates.items():
            ratios = [r / f for r, f in zip(values, rates["flow"], strict=True)]
            rows.append([f"{size}x{size}", LABELS[name], timing.spread(values, "{:,.0f}"),
                         "1x" if name == "flow" else timing.spread(ratios, "{:.1f}x")])
        judged = statistics.median(r / f for r, f in zip(rates["opencv"], rates["flow"], strict=True))
        if judged < TARGET:
            missed.append(f"{size}x{size}: {judged:.1f}x")
    print()
    print(report.markdown_table(["image size", "path", "img/s median [min-max]", "vs flow median [min-max]"], rows))
    print()
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.quick:
        print("quick run: targets not judged")
        return 0
    if missed:
        print(f"target: kftune OpenCV (numpy batches) >= {TARGET:g}x flow at both sizes: MISSED ({'; '.join(missed)})")
        return 1
    print(f"target: kftune OpenCV (numpy batches) >= {TARGET:g}x flow at both sizes: met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
