"""Peak memory of ingest and training on the bundled dataset and on a dataset ten times as large.

    .venv/bin/python bench/bench_memory.py            # --scale 10, one training epoch

The promise (docs/reliability.md): the input pipeline streams from disk, so
peak memory grows far slower than the dataset; with ten times the data, peak
RSS is at most 1.5x. Both datasets are TFRecord shards of 32x32 RGB PNGs made
from scikit-learn's digits (the bundled dataset, ingested at its default
size): the 1x set is the 1,797 digits, upscaled; the 10x set holds ten copies
of each, every copy shifted by up to a pixel and with its own noise, so that
no two images are the same. Each measurement runs in a fresh process and
reports that process's peak resident set size (getrusage's ru_maxrss), and how
much the step itself added at its peak: the resident size once its modules were
imported (TensorFlow alone is most of it) is taken off the peak reached after
that (VmHWM, reset through /proc/self/clear_refs after the imports).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(f"{field}:"))) / 1024


def _reset_peak() -> None:
    """Starts VmHWM again from the present resident size (Linux 4.0+), so that it shows the step's own peak."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- the datasets


def write_source(folder: Path, copies: int, seed: int = 0) -> int:
    """TFRecord shards of the digits as 32x32 RGB PNGs, ``copies`` perturbed copies of each; returns the count."""
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = np.kron(digits.images * (255.0 / 16.0), np.ones((4, 4)))  # 8x8 -> 32x32
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    count, shard_size = 0, 4096
    writer = None
    for copy in range(copies):
        for image, label in zip(base, digits.target, strict=True):
            if count % shard_size == 0:
                if writer is not None:
                    writer.close()
                writer = tf.io.TFRecordWriter(str(folder / f"data-{count // shard_size:05d}.tfrecord"))
            if copy:
                image = np.roll(image, tuple(rng.integers(-1, 2, 2)), axis=(0, 1)) + rng.normal(0, 8, image.shape)
            pixels = np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_png(pixels).numpy()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
            }))
            writer.write(example.SerializeToString())
            count += 1
    writer.close()
    (folder / "labels.txt").write_text("\n".join(str(c) for c in digits.target_names) + "\n")
    return count


# ---------------------------------------------------------------- what each child process measures


def child(step: str, args: list[str]) -> dict:
    import tensorflow as tf

    import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
    from kftune import dataset, finetune, models, search

    tf.constant(1.0).numpy()  # TensorFlow's runtime started: part of the floor, not of the step
    floor, started = _status_mb("VmRSS"), time.time()
    _reset_peak()
    if step == "ingest":
        source, output = args
        dataset.ingest(dataset.IngestConfig(source=source), output, progress=lambda _: None)
    elif step == "search-trial":
        data, state, epochs = args
        result = search.run_trial(data, {"trial_id": "0", "values": {"learning_rate": 0.003, "batch_size": 32}},
                                  search.SearchConfig(trial_epochs=int(epochs)), state, verbose=0)
        assert result.status == "COMPLETED", result.error
    elif step == "fine-tune":
        data, work, epochs = args
        info = dataset.DatasetInfo.load(data)
        baseline = models.save(models.small_cnn(info.shape, info.num_classes), Path(work, "baseline"),
                               models.ModelMeta(family="small_cnn", class_names=info.class_names,
                                                input_shape=list(info.shape),
                                                hyperparameters={"learning_rate": 0.003, "batch_size": 32}))
        finetune.finetune(data, baseline, finetune.FinetuneConfig(finetune_epochs=int(epochs)), Path(work, "tuned"),
                          checkpoint_dir=Path(work, "checkpoints"), progress=lambda _: None, verbose=0)
    return {"peak_mb": _peak_mb(), "step_mb": _status_mb("VmHWM") - floor, "seconds": time.time() - started}


def measure(step: str, *args: str) -> dict:
    process = subprocess.run([sys.executable, __file__, "--child", step, *args], cwd=ROOT, capture_output=True,
                             text=True)
    if process.returncode:
        raise SystemExit(f"{step} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10, help="how many times the bundled dataset (default 10)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs measured (default 1)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1:])))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = {}
        for name, copies in (("1x", 1), (f"{args.scale}x", args.scale)):
            sizes[name] = write_source(tmp / f"source-{name}", copies)
        results = {}
        for name in sizes:
            results.setdefault("ingest (TFRecord source, 32x32 RGB)", {})[name] = measure(
                "ingest", str(tmp / f"source-{name}"), str(tmp / f"data-{name}"))
            results.setdefault(f"search trial ({args.epochs} epoch, small_cnn)", {})[name] = measure(
                "search-trial", str(tmp / f"data-{name}"), str(tmp / f"state-{name}"), str(args.epochs))
            results.setdefault(f"fine-tune ({args.epochs} epoch, search winner continued)", {})[name] = measure(
                "fine-tune", str(tmp / f"data-{name}"), str(tmp / f"work-{name}"), str(args.epochs))
        rows += [[step, *by_size.values()] for step, by_size in results.items()]

    small, large = sizes
    print(f"peak RSS per step: {small} = {sizes[small]:,} images, {large} = {sizes[large]:,} images\n")
    header = ["step", f"{small} peak RSS", f"{large} peak RSS", f"{large} / {small}",
              f"{small} added by the step", f"{large} added by the step", f"{small} time", f"{large} time"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for step, a, b in rows:
        print(f"| {step} | {a['peak_mb']:.0f} MiB | {b['peak_mb']:.0f} MiB | {b['peak_mb'] / a['peak_mb']:.2f}x "
              f"| {a['step_mb']:.0f} MiB | {b['step_mb']:.0f} MiB | {a['seconds']:.1f} s | {b['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
