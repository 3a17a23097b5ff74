"""Ingest component: read a dataset, split it, write TFRecord shards."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def ingest(
    dataset: Output[Dataset],
    summary: Output[Markdown],
    source: str,
    image_size: int,
    channels: int,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    max_corrupt_fraction: float,
):
    """Reads images, splits them reproducibly, and writes a kftune dataset.

    Args:
        dataset: Output: TFRecord shards per split and info.json.
        summary: Output: class and split counts for the Kubeflow UI.
        source: bundled:digits (no network needed), a folder with one subfolder
            per class, TFRecord shards (image, label), or a gs:// prefix.
        image_size: Images are resized to image_size x image_size.
        channels: 1 (grayscale) or 3 (RGB, what pretrained backbones expect).
        validation_fraction: Share of each class held out for validation.
        test_fraction: Share of each class held out for the final test.
        seed: Seeds the split: the same seed gives the same split.
        max_corrupt_fraction: Share of undecodable images tolerated (skipped and counted).
    """
    import logging

    from kftune import dataset as ds
    from kftune import report
    from kftune.errors import user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors():
        config = ds.IngestConfig(
            source=source, image_size=image_size, channels=channels, validation_fraction=validation_fraction,
            test_fraction=test_fraction, seed=seed, max_corrupt_fraction=max_corrupt_fraction,
        )
        info = ds.ingest(config, dataset.path, progress=print)
    dataset.metadata.update({"classes": info.class_names, "splits": info.splits, "fingerprint": info.fingerprint,
                             "skipped": info.skipped})
    rows = [[name, count] for name, count in info.splits.items()] + [["skipped (undecodable)", info.skipped]]
    with open(summary.path, "w") as f:
        f.write(f"## Dataset `{source}`\n\n{info.num_classes} classes: {', '.join(info.class_names)}\n\n")
        f.write(report.markdown_table(["split", "images"], rows))
