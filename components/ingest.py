"""Ingest component: read a dataset, split it, write TFRecord shards."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def ingest(
    dataset: Output[Dataset],
    summary: Output[Markdown],
    config: str,
):
    """Reads images, splits them reproducibly, and writes a kftune dataset.

    Args:
        dataset: Output: TFRecord shards per split and info.json.
        summary: Output: class and split counts for the Kubeflow UI.
        config: The ingest settings (from the validation step): source, image_size,
            channels, validation_fraction, test_fraction, seed, max_corrupt_fraction.
    """
    import logging

    from kftune import dataset as ds
    from kftune import parameters, report
    from kftune.errors import user_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors():
        settings = parameters.load(ds.IngestConfig, config)
        info = ds.ingest(settings, dataset.path, progress=print)
    dataset.metadata.update({"classes": info.class_names, "splits": info.splits, "fingerprint": info.fingerprint,
                             "skipped": info.skipped})
    rows = [[name, count] for name, count in info.splits.items()] + [["skipped (undecodable)", info.skipped]]
    with open(summary.path, "w") as f:
        f.write(f"## Dataset `{settings.source}`\n\n{info.num_classes} classes: {', '.join(info.class_names)}\n\n")
        f.write(report.markdown_table(["split", "images"], rows))
        if info.notes:
            f.write("\n\n" + "".join(f"- {note}\n" for note in info.notes))
