"""GPU benchmark in one command: fine-tune img/s at 224 px in float32 and mixed_float16, online
augmentation's share of the training step, and the search's trials per hour, in one table.

    make bench-gpu                                         # .venv/bin/python bench/gpu.py
    .venv/bin/python bench/gpu.py --force-cpu --quick      # the same code on the CPU, small: checks the script

Without a GPU visible to TensorFlow it prints one line saying the benchmark was
skipped and exits 0. With one (kftune trains on the first GPU's strategy, as
``finetune._devices`` picks it) it measures, within ``--budget`` seconds (each
part has its share; a part that runs out of time stops after the rounds it
finished and says so):

1. Fine-tune at 224 px, as kftune's fine-tune step builds and trains it
   (``models.backbone_classifier`` and ``compile_model`` under the same strategy
   and dtype policy): the head phase (new head, frozen base) and the unfreezing
   phase (the top ``--unfreeze-layers`` layers trainable), each in float32 and in
   mixed_float16, on batches held in memory. Base weights are made locally, as
   ``kftune.fixtures`` makes them (seeded kernels, measured BatchNorm
   statistics): no download.
2. Online augmentation's share of the step: the mixed_float16 head phase trained
   on ``augment.training_batches`` (the tutorial's ImageDataGenerator
   parameters, the OpenCV path on the host's cores) against the same batches
   pre-augmented in memory; the share is ``1 - online / pre-augmented``.
3. The search's trials per hour: kftune's own ask / run_trial / tell on
   small_cnn, one worker, online augmentation (the pipeline's default spec), on
   fixture photos ingested at 224 px; every trial trains the same number of
   epochs at the same batch size, so trials differ only in learning rate.

Rates are the median of ``--repeats`` rounds with the minimum and maximum
beside them; the candidates of a part take turns within each round and every
``fit`` drops its warm-up steps. Photos come from ``kftune.fixtures``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import timing

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported (in main, after --force-cpu)

SKIPPED = "no GPU visible to TensorFlow: the GPU benchmark was skipped"
SIZE = 224


class Budget:
    """The seconds left to the whole benchmark, shared out between its parts."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def rounds(candidates: dict, repeats: int, until: float, progress) -> tuple[dict[str, list[float]], str]:
    """bench/timing.interleaved without its warm-up call (each rate call warms up itself) and stopping before a
    round that would end after ``until`` (time.monotonic()). Returns the rates and how many rounds ran."""
    rates = timing.interleaved(candidates, repeats, warmup=False, until=until,
                               progress=lambda line: progress(f"  {line}"), fmt="{:,.1f}")
    done = len(next(iter(rates.values())))
    return rates, f"{repeats} rounds" if done == repeats else f"{done} of {repeats} rounds (time cap)"


def epoch_rate(model, data, steps: int, batch_size: int) -> float:
    """Images per second of ``model.fit`` over ``steps`` steps, after as many untimed warm-up steps.

    Two epochs of ``steps``: the first traces the step and fills the pipeline, the
    second is timed between its epoch callbacks. Keras waits for the device only
    at an epoch's end when no callback needs each batch's results, so steps are
    queued on the GPU as in kftune's own training.
    """
    from kftune import models

    k = models.keras()
    times: list[float] = []

    class Clock(k.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            times.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter())

    model.fit(data, steps_per_epoch=steps, epochs=2, callbacks=[Clock()], verbose=0)
    return steps * batch_size / (times[3] - times[2])


def finetune_parts(args, strategy, photos, labels, weights: Path, budget: Budget, rows: list, progress) -> None:
    """Parts 1 and 2: fine-tune img/s per phase and precision, then online augmentation's share."""
    import tensorflow as tf
    from bench_augment_training import pre_augmented

    from kftune import augment, fixtures, models

    k = models.keras()
    classes = len(fixtures.CLASSES)
    data = tf.data.Dataset.from_tensor_slices((photos, labels))
    online = augment.training_batches(data, augment.CLASSIC, args.batch_size, seed=0).repeat()
    held = pre_augmented(online, args.held_batches)
    built = {}
    for policy in ("float32", "mixed_float16"):
        # As finetune.finetune: the policy is global while the model is built, then set back.
        k.mixed_precision.set_global_policy(policy)
        try:
            with strategy.scope():
                model, base = models.backbone_classifier(args.backbone, (SIZE, SIZE, 3), classes, weights=str(weights))
                models.compile_model(model, classes, learning_rate=1e-3)
        finally:
            k.mixed_precision.set_global_policy("float32")
        built[policy] = (model, base)

    def rate(model, source):
        return lambda: epoch_rate(model, source, args.steps, args.batch_size)

    phase_share = (budget.left() - args.search_seconds) / 3  # head, unfrozen, augmentation
    note = f"{args.backbone}, batch {args.batch_size}, {SIZE} px, {args.steps} timed steps a fit, batches in memory"
    for phase in ("head", "unfrozen"):
        if phase == "unfrozen":
            for model, base in built.values():
                # As finetune's phase 2: the top layers with weights trainable, BatchNormalization kept frozen.
                base.trainable = True
                candidates = [layer for layer in base.layers
                              if not isinstance(layer, k.layers.BatchNormalization) and layer.weights]
                for layer in base.layers:
                    layer.trainable = False
                for layer in candidates[-args.unfreeze_layers:]:
                    layer.trainable = True
                with strategy.scope():
                    models.compile_model(model, classes, learning_rate=1e-4)
        label = "head on a frozen base" if phase == "head" else f"top {args.unfreeze_layers} layers unfrozen"
        progress(f"fine-tune, {label}: float32 and mixed_float16 take turns")
        rates, done = rounds({p: rate(m, held) for p, (m, _) in built.items()}, args.repeats,
                             time.monotonic() + phase_share, progress)
        speedups = [m / f for m, f in zip(rates["mixed_float16"], rates["float32"], strict=True)]
        rows += [[f"fine-tune, {label}", "img/s, float32", timing.spread(rates["float32"], "{:,.0f}"), f"{note}; {done}"],
                 ["", "img/s, mixed_float16", timing.spread(rates["mixed_float16"], "{:,.0f}"), ""],
                 ["", "mixed_float16 / float32", timing.spread(speedups, "{:.2f}x"), "per round"]]
        if phase == "head":
            head_model = built["mixed_float16"][0]
            progress("online augmentation: the mixed_float16 head phase on online and pre-augmented batches")
            rates, done = rounds({"online": rate(head_model, online), "pre-augmented": rate(head_model, held)},
                                 args.repeats, time.monotonic() + phase_share, progress)
            shares = [1 - o / p for o, p in zip(rates["online"], rates["pre-augmented"], strict=True)]
            rows += [["online augmentation (mixed_float16 head phase)", "img/s, online",
                      timing.spread(rates["online"], "{:,.0f}"), f"tutorial's augmentation, OpenCV on {os.cpu_count()} host cores; {done}"],
                     ["", "img/s, pre-augmented in memory", timing.spread(rates["pre-augmented"], "{:,.0f}"), ""],
                     ["", "augmentation's share of step time", timing.spread([100 * s for s in shares], "{:.1f}%"),
                      "1 - online / pre-augmented, per round"]]


def search_part(args, workdir: Path, budget: Budget, rows: list, progress) -> None:
    """Part 3: trials per hour of kftune's search, one worker, trial by trial as a worker runs them."""
    from kftune import augment, dataset, fixtures, search

    fixtures.make_photos(workdir / "photos", args.search_images, size=SIZE)
    ingested = workdir / "ingested"
    dataset.ingest(dataset.IngestConfig(source=str(workdir / "photos"), image_size=SIZE), ingested,
                   progress=lambda _: None)
    data = workdir / "data"
    augment.materialize(ingested, data, augment.MILD, copies=0)  # online augmentation, as the pipeline's default
    rates = [0.0003, 0.001, 0.003, 0.01, 0.03, 0.0001, 0.0006, 0.002, 0.006, 0.02]
    space = "{learning_rate: {type: choice, values: [" + ", ".join(map(str, rates[: max(args.trials, 2)])) + "]}}"
    config = search.SearchConfig(search_space=space, search_algorithm="random", max_trials=args.trials,
                                 parallel_trials=1, trial_epochs=args.trial_epochs, batch_size=32,
                                 search_state_uri=str(workdir / "state"))
    state, seconds, started = workdir / "state", [], time.monotonic()
    note = ""
    while True:
        if seconds and time.monotonic() + max(seconds) > budget.deadline:
            note = f"; stopped after {len(seconds)} of {args.trials} trials (time cap)"
            break
        with search.oracle_turn(state) as oracle_dir:
            status, trial = search.ask(config, oracle_dir)
        if status != search.RUNNING:
            break
        result = search.run_trial(data, trial, config, Path(search.trial_uri(state, trial["trial_id"])), verbose=0)
        if result.status == "FAILED":
            raise RuntimeError(f"search trial {trial['trial_id']} failed: {result.error}")
        with search.oracle_turn(state) as oracle_dir:
            search.tell(config, oracle_dir, [result])
        seconds.append(result.seconds)
        progress(f"  trial {len(seconds)}/{args.trials}: {result.seconds:.1f} s")
    elapsed = time.monotonic() - started
    info = dataset.DatasetInfo.load(data)
    rows += [["search (small_cnn, 1 worker)", "trials per hour", f"{3600 * len(seconds) / elapsed:,.0f}",
              f"{len(seconds)} trials of {args.trial_epochs} epoch(s), batch 32, {info.splits['train']} training "
              f"images at {SIZE} px, online augmentation; wall time including the oracle{note}"],
             ["", "seconds per trial", timing.spread(seconds, "{:.1f}"), "each trial a repeat"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force-cpu", action="store_true", help="hide any GPU and run on the CPU (a dry run)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a minute on a CPU")
    parser.add_argument("--backbone", default="vgg16", help="keras.applications base (kftune's names; the tutorial's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per fit")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per part")
    parser.add_argument("--unfreeze-layers", type=int, default=20)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole benchmark")
    args = parser.parse_args(argv)
    if args.force_cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # before TensorFlow starts: it then never sees a GPU
    # Photos for the fine-tune parts, batches held in memory, search data, trials, epochs per trial.
    args.photos, args.held_batches, args.search_images, args.trials, args.trial_epochs = 512, 8, 360, 5, 2
    args.search_seconds = 150.0
    if args.quick:
        args.backbone = "mobilenet_v2_035" if args.backbone == "vgg16" else args.backbone
        args.batch_size, args.steps, args.repeats, args.budget = 8, 3, 2, 240.0
        args.photos, args.held_batches, args.search_images, args.trials, args.trial_epochs = 32, 2, 60, 2, 1
        args.search_seconds = 60.0
    started = time.monotonic()
    budget = Budget(args.budget)

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.force_cpu:
        hint = (" (nvidia-smi sees one: TensorFlow needs CUDA and cuDNN, e.g. pip install 'tensorflow[and-cuda]' "
                "at kftune's TensorFlow version, or the tensorflow/tensorflow GPU image)") if shutil.which("nvidia-smi") else ""
        print(SKIPPED + hint)
        return 0

    import cv2
    from bench_augment import cpu_model

    from kftune import augment, finetune, fixtures, report

    def progress(line: str) -> None:
        print(line, flush=True)

    strategy, _ = finetune._devices()
    device = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name) if gpus
              else f"none: the CPU ({'forced' if args.force_cpu else 'no GPU'})")
    build = tf.sysconfig.get_build_info()
    progress(f"{datetime.date.today().isoformat()}; GPU: {device}"
             + (f" ({len(gpus)} visible, {strategy.num_replicas_in_sync} replica(s))" if gpus else "")
             + f"; host: {os.cpu_count()} cores, {cpu_model()}")
    progress(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    progress(f"TensorFlow {tf.__version__} (CUDA {build.get('cuda_version', '-')}, cuDNN {build.get('cudnn_version', '-')}), "
             f"OpenCV {cv2.__version__}; budget {args.budget:.0f} s")
    augment._cv2()
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        progress(f"making {args.photos} photos and {args.backbone} base weights at {SIZE} px")
        photos, labels = fixtures.photo_arrays(args.photos, size=SIZE)
        weights = fixtures.make_backbone_weights(workdir / f"{args.backbone}.weights.h5", args.backbone, size=SIZE)
        finetune_parts(args, strategy, photos, labels, weights, budget, rows, progress)
        progress("search: trials of small_cnn, one at a time")
        search_part(args, workdir, budget, rows, progress)
    print()
    print(report.markdown_table(["part", "measure", "median [min-max]", "how"], rows))
    print()
    print(f"total {time.monotonic() - started:.0f} s (budget {args.budget:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
