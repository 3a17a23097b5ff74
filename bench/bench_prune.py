"""Pruning and quantization on the bundled task: dense vs pruned vs pruned + int8 TFLite.

    .venv/bin/python bench/bench_prune.py [--sparsity 0.8] [--prune-epochs 8]

Ingests the bundled digits with IngestConfig() defaults, trains kftune's
small_cnn until validation accuracy stops improving, prunes it with
kftune.prune (polynomial schedule, then full int8 TFLite), and prints one
table: accuracy on the validation and test splits, raw and gzip-compressed
size, and each size as a ratio against the dense model. It ends with the
issue's targets (gzip at least 3x smaller with at most 1 point lost; at least
10x smaller with int8 on top) and whether they were met.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import dataset, measure, models, quantize, report
from kftune import prune as pr


def train_dense(data_dir: Path, model_dir: Path, seed: int) -> None:
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    info = dataset.DatasetInfo.load(data_dir)
    model = models.compile_model(models.small_cnn(info.shape, info.num_classes), info.num_classes, learning_rate=1e-3)
    x, y = dataset.load_arrays(data_dir, "train")
    x_val, y_val = dataset.load_arrays(data_dir, "validation")
    stop = models.keras().callbacks.EarlyStopping(monitor="val_accuracy", patience=4, restore_best_weights=True)
    model.fit(x.astype("float32"), y, validation_data=(x_val.astype("float32"), y_val), epochs=40, batch_size=32,
              callbacks=[stop], verbose=0)
    models.save(model, model_dir, models.ModelMeta("small_cnn", info.class_names, list(info.shape),
                                                   {"batch_size": 32}, stage="baseline"))


def test_accuracy(model_or_tflite, data_dir: Path) -> float:
    x, y = dataset.load_arrays(data_dir, "test")
    if isinstance(model_or_tflite, Path):
        outputs = measure.TFLiteRunner(model_or_tflite).predict(x)
    else:
        outputs = model_or_tflite.predict(x.astype("float32"), verbose=0)
    return float(np.mean(models.predict_classes(outputs) == y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--prune-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset.ingest(dataset.IngestConfig(), tmp / "data", progress=lambda _: None)
        train_dense(tmp / "data", tmp / "dense", args.seed)
        config = pr.PruneConfig(target_sparsity=args.sparsity, prune_schedule="polynomial", prune_epochs=args.prune_epochs,
                                prune_learning_rate=1e-3, prune_quantize="int8", seed=args.seed)
        result = pr.prune(tmp / "data", tmp / "dense", config, tmp / "pruned", progress=lambda _: None, verbose=0)
        tests = [test_accuracy(models.load(tmp / folder)[0], tmp / "data") for folder in ("dense", "pruned")]
        tests.append(test_accuracy(tmp / "pruned" / quantize.file_name("int8"), tmp / "data"))

    dense = result.before
    rows = []
    for name, values, test in (
        ("dense (Keras)", dense, tests[0]),
        (f"pruned {result.sparsity['overall']:.0%} (Keras)", result.after, tests[1]),
        (f"pruned {result.sparsity['overall']:.0%} + int8 (TFLite)", result.tflite["int8"], tests[2]),
    ):
        rows.append([name, f"{values['accuracy']:.4f}", f"{test:.4f}", values["size_bytes"], values["gzip_bytes"],
                     f"{dense['size_bytes'] / values['size_bytes']:.2f}x", f"{dense['gzip_bytes'] / values['gzip_bytes']:.2f}x"])
    headers = ["model", "val accuracy", "test accuracy", "raw bytes", "gzip bytes", "raw: dense / this",
               "gzip: dense / this"]
    print(report.markdown_table(headers, rows))

    drop = dense["accuracy"] - result.after["accuracy"]
    pruned_ratio = dense["gzip_bytes"] / result.after["gzip_bytes"]
    int8_ratio = dense["gzip_bytes"] / result.tflite["int8"]["gzip_bytes"]
    checks = [
        (f"pruned gzip {pruned_ratio:.2f}x smaller (target >= 3x)", pruned_ratio >= 3),
        (f"pruned validation accuracy drop {drop * 100:.2f} points (target <= 1)", drop <= 0.01),
        (f"pruned + int8 gzip {int8_ratio:.2f}x smaller (target >= 10x)", int8_ratio >= 10),
    ]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(f"\nTensorFlow {version('tensorflow')}, tensorflow-model-optimization "
          f"{version('tensorflow-model-optimization')}, {platform.machine()}, {time.time() - started:.0f} s")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
