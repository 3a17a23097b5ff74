"""Time per training epoch of the tutorial's frozen VGG16 base against MobileNetV2 (alpha 0.35), at 224 px.

    nice -n 10 .venv/bin/python bench/bench_backbone_epoch.py            # 120 photos, 5 rounds
    nice -n 10 .venv/bin/python bench/bench_backbone_epoch.py --quick    # 40 photos, 1 round: checks the script

What `make run`'s tutorial-shaped line would cost with the tutorial's own base:
the head phase of fine-tuning (a new head on a frozen base), trained the way
kftune's fine-tune step trains it (``augment.training_batches`` with the
tutorial's ImageDataGenerator augmentation, batch 32) on the training split of
kftune.fixtures' photos at 224x224. Both models train in this process, one
epoch each per round, taking turns (bench/timing.py: the order rotates, a
first epoch of each, which traces, is dropped); each figure is the median of
the rounds with the minimum and maximum beside it, and the ratio is taken
within each round. Weights are random (``weights=None``): they change no time.
The default is 120 photos (the doc's figures before were 300): an epoch of
VGG16 costs about 0.3 s per image on 2 cores, and six of them per run keep the
script to a few minutes; time per image does not depend on the count.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timing

BACKBONES = ("mobilenet_v2_035", "vgg16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120, help="photos made (about 70%% of them train)")
    parser.add_argument("--repeats", type=int, default=timing.MIN_REPEATS, help="rounds after the warm-up")
    parser.add_argument("--quick", action="store_true", help="40 photos, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 40, 1

    import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
    from kftune import augment, dataset, fixtures, models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fixtures.make_photos(tmp / "photos", args.images)
        data = tmp / "data"
        dataset.ingest(dataset.IngestConfig(source=str(tmp / "photos"), image_size=224), data,
                       progress=lambda _: None)
        info = dataset.DatasetInfo.load(data)
        train = augment.training_batches(dataset.load_split(data, "train"), augment.CLASSIC, 32, 0)
        built = {}
        for backbone in BACKBONES:
            model, _ = models.backbone_classifier(backbone, info.shape, info.num_classes)
            models.compile_model(model, info.num_classes, learning_rate=1e-3)
            built[backbone] = model

        def epoch(model) -> float:
            times = []

            class Clock(models.keras().callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    self.started = time.perf_counter()

                def on_epoch_end(self, epoch, logs=None):
                    times.append(time.perf_counter() - self.started)

            model.fit(train, epochs=1, callbacks=[Clock()], verbose=0)
            return times[0]

        seconds = timing.interleaved({b: (lambda m=m: epoch(m)) for b, m in built.items()}, args.repeats,
                                     progress=timing.progress, fmt="{:.1f} s")

    images = info.splits["train"]
    small = seconds[BACKBONES[0]]
    print(f"one epoch of the head phase (frozen base, tutorial augmentation, batch 32), {images} training images "
          f"at 224x224; median [min-max] of {args.repeats} interleaved rounds after a warm-up epoch of each; "
          f"threads: {timing.threads()}\n")
    print("| base | parameters | s per epoch | images / s | s per epoch vs mobilenet_v2_035 |")
    print("|---|---|---|---|---|")
    for backbone, values in seconds.items():
        print(f"| {backbone} | {built[backbone].count_params():,} | {timing.spread(values, '{:.1f}')} "
              f"| {timing.spread([images / v for v in values], '{:.1f}')} "
              f"| {timing.spread(timing.ratios(values, small), '{:.1f}x')} |")


if __name__ == "__main__":
    main()
