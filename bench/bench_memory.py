"""Peak memory of each step at 224 px, on a folder of photos and on one ten times as large.

    nice -n 10 .venv/bin/python bench/bench_memory.py            # 200 and 2,000 images, 224 px
    nice -n 10 .venv/bin/python bench/bench_memory.py --quick    # 60 and 180 images, 96 px: a smoke run

The promise (docs/reliability.md): every step streams its data from disk in
batches (training keeps what it reads every epoch in memory only up to
dataset.EPOCH_CACHE_BYTES), so peak memory does not grow with the number of
images past that; with ten times the images, peak RSS is at most 1.5x. Time is
not reported: each step runs once per size here, and a timed figure in bench/
is the median of at least 5 repeats (bench/timing.py), which would make this
run about 25 minutes.
The data are kftune.fixtures' photo-like folders (six classes cut from
scikit-learn's sample photographs, JPEG and PNG, 224 px), the way a user brings
photos. Steps, each in a fresh process, as each is its own pod:

* ingest: the folder into TFRecord shards at 224x224 RGB;
* search trial: ``search.run_trial``, small_cnn, one epoch;
* fine-tune: a new head on a frozen MobileNetV2 (alpha 0.35) base, one epoch,
  with weights made locally (``python -m kftune.fixtures weights``);
* prune: ConstantSparsity(0.5) on the head's Dense layers, one epoch (masks updated every step), int8 TFLite
  calibrated on the validation split, every model measured on it;
* evaluate: the fine-tuned, pruned and int8 candidates on the test split, and the gate.

Each reports its process's peak resident set size (getrusage's ru_maxrss), and
how much the step itself added at its peak: the resident size once its modules
were imported (TensorFlow alone is most of it) is taken off the peak reached
after that (VmHWM, reset through /proc/self/clear_refs after the imports).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import child_process

ROOT = Path(__file__).resolve().parents[1]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(f"{field}:"))) / 1024


def _reset_peak() -> None:
    """Starts VmHWM again from the present resident size (Linux 4.0+), so that it shows the step's own peak."""
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------- what each child process measures


def child(step: str, work: Path, size: int) -> dict:
    import tensorflow as tf

    import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
    from kftune import dataset, finetune, models, search
    from kftune import evaluate as ev
    from kftune import prune as pr

    tf.constant(1.0).numpy()  # TensorFlow's runtime started: part of the floor, not of the step
    floor = _status_mb("VmRSS")
    _reset_peak()
    data, quiet = work / "data", {"progress": lambda _: None, "verbose": 0}
    if step == "ingest":
        dataset.ingest(dataset.IngestConfig(source=str(work / "photos"), image_size=size), data, progress=lambda _: None)
    elif step == "search trial":
        result = search.run_trial(data, {"trial_id": "0", "values": {"learning_rate": 0.001, "batch_size": 32}},
                                  search.SearchConfig(trial_epochs=1), work / "state", verbose=0)
        assert result.status == "COMPLETED", result.error
    elif step == "fine-tune":
        info = dataset.DatasetInfo.load(data)
        # Only its hyperparameters (learning rate, batch size) are read when a backbone is given.
        baseline = models.save(models.small_cnn(info.shape, info.num_classes, filters=4, dense_units=4),
                               work / "baseline",
                               models.ModelMeta(family="small_cnn", class_names=info.class_names,
                                                input_shape=list(info.shape),
                                                hyperparameters={"learning_rate": 0.001, "batch_size": 32}))
        config = finetune.FinetuneConfig(backbone="mobilenet_v2_035", weights=str(work.parent / "weights.h5"),
                                         finetune_epochs=1, unfreeze_epochs=0)
        finetune.finetune(data, baseline, config, work / "tuned", checkpoint_dir=work / "checkpoints", **quiet)
    elif step == "prune":
        config = pr.PruneConfig(prune_epochs=1, prune_frequency=1, prune_layer_types="Dense", prune_quantize="int8")
        pr.prune(data, work / "tuned", config, work / "pruned", **quiet)
    elif step == "evaluate":
        _, decision, _ = ev.evaluate_and_choose(data, {"finetuned": work / "tuned", "pruned": work / "pruned"},
                                                ev.GateConfig(max_accuracy_drop=1.0), progress=lambda _: None)
        assert decision.chosen
    return {"peak_mb": _peak_mb(), "step_mb": _status_mb("VmHWM") - floor}


def measure(step: str, work: Path, size: int) -> dict:
    return child_process.measure_in_child(__file__, step, work, size, label=step)


STEPS = ("ingest", "search trial", "fine-tune", "prune", "evaluate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images of the 1x folder (default 200)")
    parser.add_argument("--scale", type=int, default=10, help="how many times as many images the large folder holds")
    parser.add_argument("--size", type=int, default=224, help="image size in pixels (default 224)")
    parser.add_argument("--quick", action="store_true", help="60 and 180 images at 96 px: checks the script runs")
    child_process.add_option(parser, 3)
    args = parser.parse_args()
    if child_process.answer(args, lambda step, work, size: child(step, Path(work), int(size))):
        return 0
    if args.quick:
        args.images, args.scale, args.size = 60, 3, 96

    import kftune  # noqa: F401
    from kftune import fixtures

    counts = {"1x": args.images, f"{args.scale}x": args.images * args.scale}
    results: dict[str, dict[str, dict]] = {step: {} for step in STEPS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Made once, in a process of its own, so that the children only load it (as a cluster would).
        subprocess.run([sys.executable, "-m", "kftune.fixtures", "weights", str(tmp / "weights.h5"),
                        "--backbone", "mobilenet_v2_035", "--size", str(args.size)], cwd=ROOT, check=True,
                       capture_output=True)
        for name, images in counts.items():
            fixtures.make_photos(tmp / name / "photos", images, size=args.size)
            for step in STEPS:
                results[step][name] = measure(step, tmp / name, args.size)
                print(f"{step} ({name}): {results[step][name]}", file=sys.stderr)

    small, large = counts
    print(f"peak RSS per step at {args.size} px: {small} = {counts[small]:,} images, "
          f"{large} = {counts[large]:,} images; one run of each step per size (memory, not timed)\n")
    header = ["step", f"{small} peak RSS", f"{large} peak RSS", f"{large} / {small}", f"{small} added by the step",
              f"{large} added by the step"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for step, by_size in results.items():
        a, b = by_size[small], by_size[large]
        print(f"| {step} | {a['peak_mb']:.0f} MiB | {b['peak_mb']:.0f} MiB | {b['peak_mb'] / a['peak_mb']:.2f}x "
              f"| {a['step_mb']:.0f} MiB | {b['step_mb']:.0f} MiB |")
    worst = max(by_size[large]["peak_mb"] / by_size[small]["peak_mb"] for by_size in results.values())
    print(f"\ntarget: peak RSS with {large} the images at most 1.5x that with {small} for every step: "
          f"{'met' if worst <= 1.5 else 'MISSED'} (largest {worst:.2f}x)")
    return 0 if worst <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
