"""Pruning at the tutorial's shape: a MobileNetV2 base with a new head, 224 px photos, every way side by side.

    .venv/bin/python bench/bench_prune_backbone.py [--backbone mobilenet_v2] [--weights pretrained] [--images 480] [--quick]

Photos: kftune's fixture (``kftune.fixtures.make_photos``: 6 classes cut from two photographs), ingested
at 224 px with a quarter held out for validation. Base weights (``--weights``), the same file for every
row: ``pretrained`` (the default), a really pretrained MobileNetV2 from the npm registry (bench/pretrained.py:
nsfwjs's ImageNet-then-fine-tuned model; Keras' ImageNet weights cannot be downloaded here); or ``local``,
made here (``make_backbone_weights``: seeded kernels, BatchNorm statistics measured on other photos), whose
near-random features no pruning criterion can rank. The dense model is that base with kftune's head,
trained until validation accuracy stops improving (``train_dense``: head first, then the whole model, for a
pretrained base), so that its accuracy means something. Every other row starts from that dense model:

* head-only structured: today's reach (``prune_method=structured``, ``prune_layer_types=Dense``): only the
  head's Dense layers shrink, with a 1-point accuracy budget;
* backbone structured: ``prune_method=structured`` over the whole model, the base flattened into the graph
  (kftune.structured's channel groups, each losing the same share: ``prune_allocation=auto``, the
  default, which is uniform for structured pruning; the layers that lost inputs refit by least squares to the dense
  model's outputs, ``structured.reconstruct``, before fine-tuning), with a 1-point budget bisected over the
  share of all channels removed, then the same fraction trained with distillation from the dense model
  (``prune_distill_weight``);
* tfmot ConstantSparsity(0.5), 2 epochs (the tutorial's recipe): tfmot cannot wrap a nested base, so it
  reaches the head only (``prune_layer_types=Conv2D,Dense`` finds those at the top level);
* int8 alone: full-integer TFLite of the dense model; and int8 of the backbone-structured model.

Accuracy and size are measured under a shared lock on /tmp/kftune-cpu.lock (the machine's rule for
training), batch-32 latency on the CPU under the exclusive one: median [min-max] of 5 interleaved rounds
after a warm-up (bench/timing.py), threads stated. Then the goals (within 1 point of the dense model's
validation accuracy, raw file >= 3x smaller (4x for VGG16) and batch-32 latency >= 2x lower; >= 10x raw
with int8) and whether each was met: exit 1 when one is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pretrained
import timing

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, fixtures, measure, models, quantize, structured
from kftune import prune as pr

LOCK = "/tmp/kftune-cpu.lock"
# The size goals (raw file, dense / pruned): 3x for MobileNetV2, 4x for VGG16.
RAW_GOAL = {"vgg16": 4.0}


@contextlib.contextmanager
def cpu_lock(exclusive: bool):
    """The machine's shared-CPU rule: training under the shared lock, timing under the exclusive one."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def base_weights(tmp: Path, backbone: str, kind: str, seed: int) -> Path:
    """The base's weights file: ``pretrained`` (nsfwjs's MobileNetV2, bench/pretrained.py) or ``local``."""
    if kind == "pretrained":
        if backbone != "mobilenet_v2":
            raise SystemExit(f"--weights pretrained exists for mobilenet_v2 only; use --weights local for {backbone}")
        return pretrained.mobilenet_v2_weights(tmp / "weights.h5")
    return fixtures.make_backbone_weights(tmp / "weights.h5", backbone, size=224, seed=seed)


def train_dense(tmp: Path, args) -> tuple[Path, Path]:
    """The photos ingested at 224 px and the dense model trained on them. Returns (data, model).

    A pretrained base is fine-tuned as Keras' transfer-learning guide does it: the new head trained on the
    frozen base, then the whole model at the pruned models' learning rate. A base made locally computes
    near-random features, so the whole model is trained from the start at 1e-3; but a base without
    BatchNormalization (VGG16) does not train from seeded kernels, so only the head is trained on it. The base's
    BatchNormalization stays in inference mode (kftune calls the base with training=False), and each phase
    stops when validation accuracy has not improved for 3 epochs (the best epoch's weights kept)."""
    import tensorflow as tf

    fixtures.make_photos(tmp / "photos", args.images, size=224, seed=args.seed)
    weights = base_weights(tmp, args.backbone, args.weights, args.seed)
    data = tmp / "data"
    dataset.ingest(dataset.IngestConfig(source=str(tmp / "photos"), image_size=224, seed=args.seed,
                                        validation_fraction=0.25), data, progress=lambda _: None)
    info = dataset.DatasetInfo.load(data)
    tf.keras.utils.set_random_seed(args.seed)
    model, base = models.backbone_classifier(args.backbone, info.shape, info.num_classes, weights=str(weights))
    x, y = dataset.load_arrays(data, "train")
    x_val, y_val = dataset.load_arrays(data, "validation")
    if args.weights == "pretrained":
        phases = [(False, 1e-3), (True, args.prune_lr)]
    elif any(type(layer).__name__ == "BatchNormalization" for layer in base.layers):
        phases = [(True, 1e-3)]
    else:
        # VGG16 made locally: 13 convolutions without BatchNormalization trained from seeded kernels at 1e-3 stay
        # at chance (one epoch, 72 photos); the head on the frozen base learns, slowly: 0.6833 validation accuracy
        # after 9 epochs on 240 photos (early stopping), where a logistic regression on the same random features,
        # standardized, reaches 1.0 (scratch, 2026-12-07).
        phases = [(False, 1e-3)]
    for trainable, learning_rate in phases:
        base.trainable = trainable
        models.compile_model(model, info.num_classes, learning_rate=learning_rate)
        stop = models.keras().callbacks.EarlyStopping(monitor="val_accuracy", patience=3, restore_best_weights=True)
        history = model.fit(x.astype("float32"), y, validation_data=(x_val.astype("float32"), y_val),
                            epochs=args.epochs, batch_size=32, callbacks=[stop], verbose=0).history
        print(f"dense model, base {'trainable' if trainable else 'frozen'}, learning rate {learning_rate:g}: "
              f"{len(history['val_accuracy'])} epochs, best validation accuracy {max(history['val_accuracy']):.4f}")
    folder = models.save(model, tmp / "dense", models.ModelMeta(args.backbone, info.class_names, list(info.shape),
                                                               {"batch_size": 32}, stage="finetuned"))
    return data, folder


@dataclasses.dataclass
class Row:
    name: str
    path: Path  # model.keras or a .tflite file
    val: float = 0.0
    test: float = 0.0
    parameters: int = 0
    raw: int = 0
    gzip: int = 0
    note: str = ""


def runner(path: Path):
    return measure.TFLiteRunner(path) if path.suffix == ".tflite" else measure.KerasRunner(models.load(path.parent)[0])


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(models.predict_classes(runner(path).predict(x)) == y))


def diagnose(dense: Path, data: Path, levels: list[float], x: np.ndarray, y: np.ndarray) -> None:
    """What the importance criterion has to go on in the dense model, and what removing channels costs before
    any training: the BatchNorm scales' spread, and at each level (that share of every group) the validation
    accuracy of the shrunk model as it comes, its removed channels dropped, and after structured.reconstruct
    refits the layers that lost inputs on the first training images, as the prune step does."""
    model, _ = models.load(dense)
    graph = structured.graph(model)
    gammas = [np.abs(layer.gamma.numpy()) for layer in graph.layers.values()
              if type(layer).__name__ == "BatchNormalization" and layer.scale]
    if gammas:
        scales = np.concatenate(gammas)
        print(f"dense model's BatchNorm |gamma| over {scales.size:,} channels: mean {scales.mean():.3f}, "
              f"standard deviation {scales.std():.3f}")
    else:  # VGG16: a chain of convolutions, ranked by kernel L1
        print("dense model has no BatchNormalization: structured pruning ranks its channels by kernel L1")
    images, _ = dataset.load_arrays(data, "train")
    images = images[:pr.RECONSTRUCT_IMAGES].astype("float32")
    for level in levels:
        shrunk, the_plan = structured.shrink(model, level)
        dropped = float(np.mean(models.predict_classes(shrunk.predict(x, batch_size=32, verbose=0)) == y))
        refits = structured.reconstruct(model, shrunk, the_plan, images)
        refit = float(np.mean(models.predict_classes(shrunk.predict(x, batch_size=32, verbose=0)) == y))
        print(f"{level:.0%} of each group removed, before any training: validation accuracy {dropped:.4f} with "
              f"the channels dropped, {refit:.4f} with {len(refits)} layers refit ({len(the_plan.unranked)} groups "
              "unranked)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenet_v2", choices=sorted(models.BACKBONES))
    parser.add_argument("--weights", choices=("pretrained", "local"), default="pretrained",
                        help="the base's weights: pretrained (nsfwjs's MobileNetV2 from the npm registry, "
                             "bench/pretrained.py) or local (kftune.fixtures.make_backbone_weights)")
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=12, help="most epochs of training the dense model")
    parser.add_argument("--prune-epochs", type=int, default=6)
    parser.add_argument("--levels", default="0.4,0.5,0.6,0.7")
    # 1e-3 (PruneConfig's default) with a fresh Adam left the end-to-end trained model at chance within 36 steps.
    parser.add_argument("--prune-lr", type=float, default=1e-4, help="learning rate of training the pruned models")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few images and epochs: checks the script, not the goals")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.prune_epochs, args.levels, args.repeats = 72, 1, 1, "0.5", 5
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with cpu_lock(exclusive=False):
            rows, info, x_val, y_val, y_test = measure_rows(tmp, args)
        trained_s = time.time() - started
        # Timing: every row once per round, in rotating order, under the exclusive lock (nobody else computing).
        with cpu_lock(exclusive=True):
            import tensorflow as tf

            runners = {row.name: runner(row.path) for row in rows}
            batch = x_val[:32].astype("float32")
            times = timing.interleaved({name: (lambda r=r: measure.latency_ms(r, batch, batch_size=32, repeats=3))
                                        for name, r in runners.items()}, repeats=args.repeats)
            threads = (tf.config.threading.get_intra_op_parallelism_threads(),
                       tf.config.threading.get_inter_op_parallelism_threads())
    return report(args, rows, info, y_val, y_test, times, threads, trained_s, started)


def measure_rows(tmp: Path, args):
    """Trains the dense model, prunes it every way, and measures accuracy and size of every row."""
    rows: list[Row] = []
    data, dense = train_dense(tmp, args)
    x_val, y_val = dataset.load_arrays(data, "validation")
    diagnose(dense, data, [0.5], x_val.astype("float32"), y_val)
    common = dict(prune_epochs=args.prune_epochs, prune_learning_rate=args.prune_lr, seed=args.seed,
                  prune_quantize="")
    budget = dict(prune_max_accuracy_drop=0.01, prune_sparsity_levels=args.levels)
    runs = {
        "head-only structured (today)": pr.PruneConfig(prune_method="structured", prune_layer_types="Dense",
                                                       **common, **budget),
        "backbone structured": pr.PruneConfig(prune_method="structured", **common, **budget),
    }
    reports = {}
    for name, config in runs.items():
        reports[name] = pr.prune(data, dense, config, tmp / name.split()[0], progress=print, verbose=0)
    fraction = reports["backbone structured"].target_sparsity
    distill = pr.PruneConfig(prune_method="structured", target_sparsity=fraction, prune_distill_weight=0.5,
                             prune_distill_temperature=4.0, **{**common, "prune_quantize": "int8"})
    reports["backbone structured + distillation"] = pr.prune(data, dense, distill, tmp / "distilled",
                                                             progress=print, verbose=0)
    tfmot = pr.PruneConfig(prune_method="magnitude", prune_schedule="constant", target_sparsity=0.5,
                           prune_epochs=2, prune_learning_rate=1e-3, prune_layer_types="Conv2D,Dense",
                           prune_allocation="uniform", prune_frequency=1 if args.quick else 10, seed=args.seed,
                           prune_quantize="")
    reports["tfmot ConstantSparsity 0.5 (head)"] = pr.prune(data, dense, tfmot, tmp / "tfmot", progress=print,
                                                            verbose=0)
    info = dataset.DatasetInfo.load(data)
    x_test, y_test = dataset.load_arrays(data, "test")
    dense_model, _ = models.load(dense)
    (tmp / "int8").mkdir()
    quantize.quantize(dense_model, ["int8"], tmp / "int8", dataset.load_split(data, "validation"))
    paths = {"dense (fine-tuned)": dense / models.MODEL_FILE,
             **{name: tmp / folder / models.MODEL_FILE for name, folder in
                (("head-only structured (today)", "head-only"), ("backbone structured", "backbone"),
                 ("backbone structured + distillation", "distilled"),
                 ("tfmot ConstantSparsity 0.5 (head)", "tfmot"))},
             "int8 alone": tmp / "int8" / quantize.file_name("int8"),
             "backbone structured + distillation + int8": tmp / "distilled" / quantize.file_name("int8")}
    for name, path in paths.items():
        size = measure.file_size(path)
        model_params = models.load(path.parent)[0].count_params() if path.suffix != ".tflite" else \
            models.load(dense if name == "int8 alone" else path.parent)[0].count_params()
        rows.append(Row(name, path, accuracy(path, x_val, y_val), accuracy(path, x_test, y_test), model_params,
                        size.raw_bytes, size.gzip_bytes))
    for row in rows:
        report = reports.get(row.name)
        if report is not None:
            # Every structured row runs with prune_allocation=auto, PruneConfig's default: uniform shares.
            row.note = (f"{report.target_sparsity:.0%} " + ("of each group's channels removed, layers refit"
                                                             if report.method == "structured" else "sparsity"))
    return rows, info, x_val, y_val, y_test


def report(args, rows, info, y_val, y_test, times, threads, trained_s, started) -> int:
    """Prints the table and the goals; 1 when a goal is missed."""
    dense_row = rows[0]
    where = "pretrained: nsfwjs 4.4.0's" if args.weights == "pretrained" else "made locally"
    print(f"\n{args.backbone} base (weights {where}, the same for every row), {info.num_classes} classes of "
          f"kftune's fixture photos at 224 px: {len(y_val)} validation and {len(y_test)} test images; "
          f"{args.images} images in all. Dense model trained {args.epochs} epochs at most (early stopping), pruned "
          f"models {args.prune_epochs}. Accuracy and size under the shared lock, {trained_s:.0f} s.")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; TensorFlow threads intra/inter "
          f"{threads[0]}/{threads[1]} (0 = TensorFlow's default, all cores); batch-32 latency median [min-max] of "
          f"{len(times[dense_row.name])} interleaved rounds, warm-up dropped, each round the median of 3 calls.\n")
    print("| model | val acc | test acc | parameters | raw bytes | dense raw / raw | batch-32 ms | dense ms / ms | "
          "what |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = timing.ratios(times[dense_row.name], times[row.name])
        print(f"| {row.name} | {row.val:.4f} | {row.test:.4f} | {row.parameters:,} | {row.raw:,} | "
              f"{dense_row.raw / row.raw:.2f}x | {timing.spread(times[row.name])} | {timing.spread(ratio)}x | "
              f"{row.note} |")
    by = {row.name: row for row in rows}
    raw_goal = RAW_GOAL.get(args.backbone, 3.0)
    goals = []
    for name in ("backbone structured", "backbone structured + distillation"):
        row = by[name]
        speed = timing.median(timing.ratios(times[dense_row.name], times[name]))
        goals += [(f"{name}: within 1 point of dense validation accuracy ({row.val:.4f} vs {dense_row.val:.4f})",
                   dense_row.val - row.val <= 0.01 + 1e-9),
                  (f"{name}: raw file >= {raw_goal:g}x smaller ({dense_row.raw / row.raw:.2f}x)",
                   dense_row.raw / row.raw >= raw_goal),
                  (f"{name}: batch-32 latency >= 2x lower ({speed:.2f}x, median)", speed >= 2)]
    int8 = by["backbone structured + distillation + int8"]
    goals.append((f"backbone structured + distillation + int8: raw >= 10x smaller ({dense_row.raw / int8.raw:.2f}x)",
                  dense_row.raw / int8.raw >= 10))
    print("\nGoals:")
    for text, met in goals:
        print(f"- {'met' if met else 'MISSED'}: {text}")
    print(f"\n{time.time() - started:.0f} s in all; command: {' '.join(sys.argv)}")
    return 0 if all(met for _, met in goals) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
