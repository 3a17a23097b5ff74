"""Pruning side by side on the bundled task: dense, tfmot's tutorial recipe, kftune magnitude, kftune structured.

    .venv/bin/python bench/bench_prune.py [--quick] [--seed 0]
    .venv/bin/python bench/bench_prune.py --sweep      # the measurements behind PruneConfig's defaults
    .venv/bin/python bench/bench_prune.py --head       # a trained head on a frozen MobileNetV2 0.35, 224 px photos

Ingests the bundled digits with IngestConfig() defaults, trains kftune's
small_cnn until validation accuracy stops improving, then prunes it four
ways with kftune.prune, each also quantized to full int8 TFLite:

* tfmot's tutorial recipe: ConstantSparsity(0.5), 2 epochs at 1e-3 (frequency 10, not
  100: 2 epochs here are 80 steps);
* kftune magnitude pruning with its defaults and a 1-point accuracy budget
  (bisection over the sparsity ladder): with its default global allocation (one
  magnitude threshold over all layers), and with every layer to the same sparsity
  (uniform, tfmot's way) beside it;
* kftune structured pruning (prune_method=structured) with the same budget
  over the share of filters and units removed.

It prints one table (validation and test accuracy, parameters, raw and gzip
size, both as ratios against the dense model, latency at batch 1 and 32 on
the CPU: median [min-max] of 5 interleaved rounds, bench/timing.py), then the issue's targets and whether each was met. ``--quick``
trains less and tries fewer levels (1-2 minutes), for checking the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import timing

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, measure, models, quantize, report
from kftune import prune as pr


def train_dense(data_dir: Path, model_dir: Path, seed: int, epochs: int) -> None:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    info = dataset.DatasetInfo.load(data_dir)
    model = models.compile_model(models.small_cnn(info.shape, info.num_classes), info.num_classes, learning_rate=1e-3)
    x, y = dataset.load_arrays(data_dir, "train")
    x_val, y_val = dataset.load_arrays(data_dir, "validation")
    stop = models.keras().callbacks.EarlyStopping(monitor="val_accuracy", patience=4, restore_best_weights=True)
    model.fit(x.astype("float32"), y, validation_data=(x_val.astype("float32"), y_val), epochs=epochs, batch_size=32,
              callbacks=[stop], verbose=0)
    models.save(model, model_dir, models.ModelMeta("small_cnn", info.class_names, list(info.shape),
                                                   {"batch_size": 32}, stage="baseline"))


def train_head(tmp: Path, seed: int, images: int, epochs: int) -> Path:
    """The head-pruning case: the photo fixture at 224 px, a new head trained on a frozen MobileNetV2 (0.35) base.

    The base's weights are made locally (``kftune.fixtures``: seeded random kernels, BatchNorm statistics
    measured on photos), not ImageNet's: Keras cannot download them here. Returns the ingested data folder.
    """
    from kftune import finetune, fixtures

    fixtures.make_photos(tmp / "photos", images, size=224, seed=seed)
    fixtures.make_backbone_weights(tmp / "weights.h5", "mobilenet_v2_035", size=224, seed=seed)
    data = tmp / "data"
    dataset.ingest(dataset.IngestConfig(source=str(tmp / "photos"), image_size=224, seed=seed), data,
                   progress=lambda _: None)
    info = dataset.DatasetInfo.load(data)
    # With a backbone, fine-tuning reads only the baseline's hyperparameters (learning rate, batch size).
    baseline = models.save(models.small_cnn(info.shape, info.num_classes, filters=4, dense_units=4), tmp / "baseline",
                           models.ModelMeta(family="small_cnn", class_names=info.class_names,
                                            input_shape=list(info.shape),
                                            hyperparameters={"learning_rate": 0.001, "batch_size": 32}))
    config = finetune.FinetuneConfig(backbone="mobilenet_v2_035", weights=str(tmp / "weights.h5"),
                                     finetune_epochs=epochs, unfreeze_epochs=0, seed=seed)
    finetune.finetune(data, baseline, config, tmp / "dense", progress=lambda _: None, verbose=0)
    return data


def test_accuracy(model_or_tflite, x: np.ndarray, y: np.ndarray) -> float:
    if isinstance(model_or_tflite, Path):
        outputs = measure.TFLiteRunner(model_or_tflite).predict(x)
    else:
        outputs = model_or_tflite.predict(x.astype("float32"), verbose=0)
    return float(np.mean(models.predict_classes(outputs) == y))


def measured_keras(model, folder: Path, x_val, y_val, x_test, y_test) -> dict:
    size = measure.file_size(folder / models.MODEL_FILE)
    models.compile_model(model, len(models.load(folder)[1].class_names))
    return {"val": test_accuracy(model, x_val, y_val), "test": test_accuracy(model, x_test, y_test),
            "parameters": model.count_params(), "raw": size.raw_bytes, "gzip": size.gzip_bytes,
            "time": lambda batch: measure.latency_ms(measure.KerasRunner(model), x_val, batch_size=batch)}


def measured_tflite(path: Path, parameters: int, x_val, y_val, x_test, y_test) -> dict:
    size = measure.file_size(path)
    return {"val": test_accuracy(path, x_val, y_val), "test": test_accuracy(path, x_test, y_test),
            "parameters": parameters, "raw": size.raw_bytes, "gzip": size.gzip_bytes,
            "time": lambda batch: measure.latency_ms(measure.TFLiteRunner(path), x_val, batch_size=batch)}


def time_all(results: dict, repeats: int) -> None:
    """Latency of every model at batch 1 and 32: ``repeats`` interleaved rounds after a warm-up (bench/timing.py);
    each round's figure is ``measure.latency_ms`` (the median of up to 20 calls). Stores the rounds' figures."""
    for batch in (1, 32):
        rounds = timing.interleaved({key: (lambda v=values, b=batch: v["time"](b)) for key, values in results.items()},
                                    repeats, progress=lambda line, b=batch: timing.progress(f"latency b{b} {line}"))
        for key, values in rounds.items():
            results[key][f"b{batch}"] = values


def sweep(data_dir: Path, dense_dir: Path, seed: int) -> None:
    """Validation accuracy after magnitude pruning to 95% and structured to 60%: schedule x epochs x learning rate.

    95%: with the global allocation every setting holds 80% within a point, so 80% no longer tells them apart."""
    rows = []
    for method, level in (("magnitude", 0.95), ("structured", 0.6)):
        schedules = ("constant", "polynomial") if method == "magnitude" else ("-",)
        for schedule in schedules:
            for epochs in (2, 8):
                for lr in (1e-4, 1e-3):
                    config = pr.PruneConfig(prune_method=method, target_sparsity=level,
                                            prune_schedule="constant" if schedule == "-" else schedule,
                                            prune_epochs=epochs, prune_learning_rate=lr, prune_quantize="", seed=seed)
                    with tempfile.TemporaryDirectory() as out:
                        result = pr.prune(data_dir, dense_dir, config, out, progress=lambda _: None, verbose=0)
                    drop = result.before["accuracy"] - result.after["accuracy"]
                    # Accuracy only: one run's seconds would be a timing that is not a median of repeats.
                    rows.append([method, f"{level:.0%}", schedule, epochs, f"{lr:g}", f"{result.after['accuracy']:.4f}",
                                 f"{drop * 100:+.2f}"])
                    print(report.markdown_table(["method", "level", "schedule", "epochs", "lr", "val accuracy",
                                                 "points lost"], rows[-1:]).splitlines()[-1], flush=True)
    print(f"\ndense validation accuracy {result.before['accuracy']:.4f}\n")
    print(report.markdown_table(["method", "level", "schedule", "epochs", "lr", "val accuracy", "points lost"], rows))


def sweep_end(data_dir: Path, dense_dir: Path) -> None:
    """Points lost by magnitude pruning (8 epochs) at 85% and 90%, over 4 seeds of the pruning run: every layer
    to the target (uniform) with pruning ending at the last step, at 3/4 or at 1/2 of training (the rest trains
    on at the target sparsity), and one global magnitude threshold (the default)."""
    steps = math.ceil(dataset.DatasetInfo.load(data_dir).splits["train"] / 32) * 8
    rows = []
    for level in (0.85, 0.9):
        for allocation, share in (("uniform", 1.0), ("uniform", 0.75), ("uniform", 0.5), ("global", 1.0)):
            drops = []
            for seed in (1, 2, 3, 4):
                config = pr.PruneConfig(target_sparsity=level, prune_epochs=8, prune_quantize="", seed=seed,
                                        prune_allocation=allocation, prune_end_step=int(steps * share) // 10 * 10)
                with tempfile.TemporaryDirectory() as out:
                    result = pr.prune(data_dir, dense_dir, config, out, progress=lambda _: None, verbose=0)
                drops.append((result.before["accuracy"] - result.after["accuracy"]) * 100)
            rows.append([f"{level:.0%}", allocation, f"{share:g}", " ".join(f"{d:+.2f}" for d in drops),
                         f"{np.mean(drops):+.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    print(report.markdown_table(["sparsity", "allocation", "pruning ends at (share of training)",
                                 "points lost, seeds 1-4", "mean"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="train less and try fewer levels (checks the script)")
    parser.add_argument("--sweep", action="store_true", help="measure schedule x epochs x learning rate instead")
    parser.add_argument("--head", action="store_true",
                        help="the head-pruning case: a trained head on a frozen MobileNetV2 0.35 base, 224 px photos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.head:
            data = train_head(tmp, args.seed, images=120 if args.quick else 300, epochs=2 if args.quick else 5)
        else:
            data = tmp / "data"
            dataset.ingest(dataset.IngestConfig(), data, progress=lambda _: None)
            train_dense(data, tmp / "dense", args.seed, epochs=3 if args.quick else 40)
        if args.sweep:
            sweep(data, tmp / "dense", args.seed)
            sweep_end(data, tmp / "dense")
            return 0
        x_val, y_val = dataset.load_arrays(data, "validation")
        x_test, y_test = dataset.load_arrays(data, "test")
        quick = {"prune_epochs": 1} if args.quick else {}
        runs = [
            ("tfmot tutorial: ConstantSparsity(0.5)", "tutorial", pr.PruneConfig(
                target_sparsity=0.5, prune_schedule="constant", prune_epochs=2, prune_frequency=10,
                prune_learning_rate=1e-3, prune_quantize="int8", seed=args.seed)),
            ("kftune magnitude, 1-point budget", "magnitude", pr.PruneConfig(
                prune_max_accuracy_drop=0.01, prune_quantize="int8", seed=args.seed,
                **({"prune_sparsity_levels": "0.8,0.9"} if args.quick else {}), **quick)),
            # tfmot's way of sharing the target: every layer to the same sparsity.
            ("kftune magnitude, uniform allocation, 1-point budget", "magnitude_uniform", pr.PruneConfig(
                prune_allocation="uniform", prune_max_accuracy_drop=0.01, prune_quantize="int8", seed=args.seed,
                **({"prune_sparsity_levels": "0.8,0.9"} if args.quick else {}), **quick)),
            ("kftune structured, 1-point budget", "structured", pr.PruneConfig(
                prune_method="structured", prune_max_accuracy_drop=0.01, prune_quantize="int8", seed=args.seed,
                prune_sparsity_levels="0.5,0.6" if args.quick else "0.5,0.6,0.7,0.75,0.8", **quick)),
        ]
        if args.head:
            # tfmot cannot prune the nested base: every method works on the head (its Dense layers); the tutorial
            # row is the tutorial's own step, ConstantSparsity(0.5) on them. Masks update every step: a few
            # hundred photos make only a few dozen steps.
            runs = [(title, key, dataclasses.replace(config, prune_layer_types="Dense", prune_frequency=1))
                    for title, key, config in runs if key != "magnitude_uniform"]
        dense_model = models.load(tmp / "dense")[0]
        results = {"dense": measured_keras(dense_model, tmp / "dense", x_val, y_val, x_test, y_test)}
        quantize.quantize(dense_model, ["int8"], tmp / "dense", dataset.load_split(data, "validation"))
        results["dense int8"] = measured_tflite(tmp / "dense" / quantize.file_name("int8"), dense_model.count_params(),
                                                x_val, y_val, x_test, y_test)
        names = {"dense": "dense (Keras)", "dense int8": "dense + int8 (TFLite)"}
        kept = {}
        for title, key, config in runs:
            out = tmp / key
            result = pr.prune(data, tmp / "dense", config, out, progress=lambda line: print(line, flush=True), verbose=0)
            kept[key] = result
            model = models.load(out)[0]
            level = f"{result.target_sparsity:.0%}" + (" narrower" if key == "structured" else " sparse")
            names[key], names[f"{key} int8"] = f"{title} ({level})", f"{title} ({level}) + int8"
            results[key] = measured_keras(model, out, x_val, y_val, x_test, y_test)
            results[f"{key} int8"] = measured_tflite(out / quantize.file_name("int8"), model.count_params(),
                                                     x_val, y_val, x_test, y_test)
        time_all(results, repeats=1 if args.quick else timing.MIN_REPEATS)

    dense = results["dense"]
    rows = [[names[key], f"{v['val']:.4f}", f"{v['test']:.4f}", v["parameters"], v["raw"], v["gzip"],
             f"{dense['raw'] / v['raw']:.2f}x", f"{dense['gzip'] / v['gzip']:.2f}x", timing.spread(v["b1"], "{:.3f}"),
             timing.spread(v["b32"], "{:.2f}"), timing.spread(timing.ratios(dense["b32"], v["b32"]), "{:.2f}x")]
            for key, v in results.items()]
    print(report.markdown_table(["model", "val accuracy", "test accuracy", "parameters", "raw bytes", "gzip bytes",
                                 "raw: dense / this", "gzip: dense / this", "latency ms b1", "latency ms b32",
                                 "b32: dense / this"], rows))
    print(f"\nlatency: median [min-max] of {len(dense['b32'])} interleaved rounds after a warm-up round, each round "
          f"the median of up to 20 calls of one batch "
          f"(at least {measure.LATENCY_MIN_REPEATS}, fewer than 20 past {measure.LATENCY_BUDGET_S:g} s); ratios taken within each round. Threads: {timing.threads()}; TFLite: LiteRT's "
          "interpreter with its default thread count (num_threads unset), as kftune evaluates.")
    for key in (key for key in kept if kept[key].max_accuracy_drop):
        print(f"{key} budget search tried: " + ", ".join(
            f"{a['sparsity']:.0%} ({a['accuracy_drop'] * 100:+.2f} pts lost)" for a in kept[key].attempts))

    def drop(key):
        return (dense["val"] - results[key]["val"]) * 100

    if args.head:
        # The targets are for the whole-model case; here the frozen base is most of the file.
        print(f"\nhead case: frozen MobileNetV2 0.35 base (weights made locally), 224 px photos, {time.time() - started:.0f} s")
        return 0
    s, si = results["structured"], results["structured int8"]
    structured_b32 = timing.median(timing.ratios(dense["b32"], s["b32"]))
    checks = []
    # The targets are for what kftune does by default; the uniform row is there to compare.
    for key in ("magnitude",):
        m, mi = results[key], results[f"{key} int8"]
        checks += [
            (f"{key}: {drop(key):.2f} points lost (<= 1), gzip {dense['gzip'] / m['gzip']:.2f}x (>= 4x)",
             drop(key) <= 1 and dense["gzip"] / m["gzip"] >= 4),
            (f"{key} + int8: {drop(key + ' int8'):.2f} points lost (<= 1), gzip {dense['gzip'] / mi['gzip']:.2f}x (>= 12x)",
             drop(key + " int8") <= 1 and dense["gzip"] / mi["gzip"] >= 12),
        ]
    checks += [
        (f"structured: {drop('structured'):.2f} points lost (<= 1), raw {dense['raw'] / s['raw']:.2f}x (>= 4x), "
         f"b32 latency {structured_b32:.2f}x lower (>= 2x, median of the rounds)",
         drop("structured") <= 1 and dense["raw"] / s["raw"] >= 4 and structured_b32 >= 2),
        (f"structured + int8: {drop('structured int8'):.2f} points lost (<= 1), raw {dense['raw'] / si['raw']:.2f}x (>= 12x)",
         drop("structured int8") <= 1 and dense["raw"] / si["raw"] >= 12),
    ]
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(f"\nTensorFlow {version('tensorflow')}, tensorflow-model-optimization "
          f"{version('tensorflow-model-optimization')}, {platform.machine()}, {time.time() - started:.0f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
