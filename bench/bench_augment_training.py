"""Does online augmentation keep training fed? Training with it against training on pre-augmented batches.

Two trainings, each as kftune trains (``model.fit`` on ``augment.training_batches``
with the tutorial's ImageDataGenerator augmentation, ``augment.CLASSIC``, batch 32):
small_cnn at 64 px, and the head phase of fine-tuning (a new head on a frozen
MobileNetV2 alpha 0.35, ``weights=None``: random weights cost the same time) at
224 px, on photos from ``kftune.fixtures``. Each trains once on the online pipeline
and once on the same pipeline's first batches held in memory (``take(K).cache()``,
filled before timing): the same model, data, batch size and threads, with no
augmentation left to do. The ratio of the two rates says how long the training
step waits for augmentation; on a CPU both share the cores, so augmentation's CPU
time shows in it even when it never makes the step wait.

Every figure is the median of ``--repeats`` rounds with the minimum and maximum
beside it; each round runs both modes (their order alternating between rounds),
each a fresh ``fit`` of ``--steps`` steps after warm-up steps that are not timed.
Target (issue 26): online at least 90% of pre-augmented throughput (augmentation
costs the training at most a tenth), judged on the median; exit 1 when missed.

    .venv/bin/python bench/bench_augment_training.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import timing

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import augment, fixtures, models, report

TARGET = 0.9
WARMUP_STEPS = 5
BATCH_SIZE = 32
# (model, image size, photos, timed steps, batches held in memory for the pre-augmented mode)
SETUPS = (("small_cnn", 64, 512, 300, 16), ("mobilenet_v2_035", 224, 256, 120, 8))


def train_rate(model, data, steps: int, batch_size: int, warmup: int = WARMUP_STEPS) -> float:
    """Images per second of ``model.fit`` on ``data`` over ``steps`` steps after ``warmup`` untimed ones.

    Timed from the end of the last warm-up step to the end of the last step; a
    batch-level callback makes Keras wait for each step's results, as its
    progress bar does, so the times are those of finished steps.
    """
    k = models.keras()
    ends: list[float] = []

    class Clock(k.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    model.fit(data, steps_per_epoch=warmup + steps, epochs=1, callbacks=[Clock()], verbose=0)
    return steps * batch_size / (ends[-1] - ends[warmup - 1])


def pre_augmented(online, batches: int):
    """The first ``batches`` batches of ``online``, held in memory and repeated: training with nothing to augment."""
    held = online.take(batches).cache()
    for _ in held:  # fills the cache before any timing
        pass
    return held.repeat()


def build(name: str, size: int, classes: int):
    if name == "small_cnn":
        model = models.small_cnn((size, size, 3), classes)
    else:
        model, _ = models.backbone_classifier(name, (size, size, 3), classes)
    return models.compile_model(model, classes)


def measure(name: str, size: int, images: int, steps: int, held: int, repeats: int, progress) -> dict[str, list[float]]:
    import tensorflow as tf

    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(0)
    x, y = fixtures.photo_arrays(images, size=size)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    online = augment.training_batches(data, augment.CLASSIC, BATCH_SIZE, seed=0).repeat()
    modes = {"online": online, "pre-augmented": pre_augmented(online, held)}
    model = build(name, size, len(fixtures.CLASSES))
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(repeats):
        order = list(modes) if round_ % 2 == 0 else list(modes)[::-1]
        for mode in order:
            rates[mode].append(train_rate(model, modes[mode], steps, BATCH_SIZE))
        progress(f"{name} {size}px round {round_ + 1}/{repeats}: "
                 + ", ".join(f"{mode} {r[-1]:,.1f} img/s" for mode, r in rates.items()))
    return rates


def main() -> int:
    import cv2
    import tensorflow as tf
    from bench_augment import cpu_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each figure is their median [min-max]")
    parser.add_argument("--quick", action="store_true", help="one short round, to check the script runs; no target")
    args = parser.parse_args()
    setups = SETUPS
    if args.quick:
        args.repeats = 1
        setups = tuple((name, size, 64, 10, 2) for name, size, *_ in SETUPS)
    augment._cv2()
    print(f"{datetime.date.today().isoformat()}; {os.cpu_count()} cores, {cpu_model()}; "
          f"load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}", flush=True)
    print(f"TensorFlow {tf.__version__}, OpenCV {cv2.__version__}; batch size {BATCH_SIZE}; {args.repeats} rounds; "
          f"GPU: {'yes' if tf.config.list_physical_devices('GPU') else 'none visible'}; threads: TensorFlow's "
          f"intra-op pool {tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}, tf.data's "
          f"parallel map AUTOTUNE, OpenCV {cv2.getNumThreads()} per map call", flush=True)
    rows, missed = [], []
    for name, size, images, steps, held in setups:
        rates = measure(name, size, images, steps, held, args.repeats, lambda line: print(line, flush=True))
        ratios = [o / p for o, p in zip(rates["online"], rates["pre-augmented"], strict=True)]
        rows.append([name, f"{size}x{size}", f"{steps} (+{WARMUP_STEPS} warm-up)", timing.spread(rates["online"], "{:,.1f}"),
                     timing.spread(rates["pre-augmented"], "{:,.1f}"), timing.spread(ratios, "{:.3f}")])
        if statistics.median(ratios) < TARGET:
            missed.append(f"{name}: {statistics.median(ratios):.3f}")
    print()
    print(report.markdown_table(["model", "images", "steps per fit", "online img/s", "pre-augmented img/s",
                                 "online / pre-augmented"], rows))
    print()
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.quick:
        print("quick run: target not judged")
        return 0
    verdict = f"MISSED ({'; '.join(missed)})" if missed else "met"
    print(f"target: online augmentation at least {TARGET:.0%} of pre-augmented training throughput: {verdict}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
