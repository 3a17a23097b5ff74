"""Time per training epoch of the tutorial's frozen VGG16 base against MobileNetV2 (alpha 0.35), at 224 px.

    nice -n 10 .venv/bin/python bench/bench_backbone_epoch.py            # 300 photos, 2 epochs each
    nice -n 10 .venv/bin/python bench/bench_backbone_epoch.py --quick    # 60 photos

What `make run`'s tutorial-shaped line would cost with the tutorial's own base:
the head phase of fine-tuning (a new head on a frozen base), trained the way
kftune's fine-tune step trains it (``augment.training_batches`` with the
tutorial's ImageDataGenerator augmentation, batch 32) on the training split of
kftune.fixtures' photos at 224x224. Each backbone trains in its own process, so
neither inherits the other's memory or threads. The first epoch includes
tracing; the second is the one reported. Weights are random (``weights=None``):
they change no time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import child_process

BACKBONES = ("mobilenet_v2_035", "vgg16")


def child(backbone: str, data: Path, epochs: int) -> dict:
    import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
    from kftune import augment, dataset, models

    info = dataset.DatasetInfo.load(data)
    model, _ = models.backbone_classifier(backbone, info.shape, info.num_classes)
    models.compile_model(model, info.num_classes, learning_rate=1e-3)
    train = augment.training_batches(dataset.load_split(data, "train"), augment.CLASSIC, 32, 0)
    times = []

    class Clock(models.keras().callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    model.fit(train, epochs=epochs, callbacks=[Clock()], verbose=0)
    return {"seconds": times[-1], "images": info.splits["train"], "parameters": int(model.count_params())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="60 photos")
    child_process.add_option(parser, 3)
    args = parser.parse_args()
    if child_process.answer(args, lambda backbone, data, epochs: child(backbone, Path(data), int(epochs))):
        return
    if args.quick:
        args.images = 60

    import kftune  # noqa: F401
    from kftune import dataset, fixtures

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fixtures.make_photos(tmp / "photos", args.images)
        dataset.ingest(dataset.IngestConfig(source=str(tmp / "photos"), image_size=224), tmp / "data",
                       progress=lambda _: None)
        for backbone in BACKBONES:
            results[backbone] = child_process.measure_in_child(__file__, backbone, tmp / "data", args.epochs,
                                                               label=backbone)

    small = results[BACKBONES[0]]
    print(f"one epoch of the head phase (frozen base, tutorial augmentation, batch 32), "
          f"{small['images']} training images at 224x224\n")
    print("| base | parameters | s per epoch | images / s | vs mobilenet_v2_035 |")
    print("|---|---|---|---|---|")
    for backbone, r in results.items():
        print(f"| {backbone} | {r['parameters']:,} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.1f} "
              f"| {r['seconds'] / small['seconds']:.1f}x |")


if __name__ == "__main__":
    main()
