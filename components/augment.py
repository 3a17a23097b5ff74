"""Augment component: validate the spec, preview it, augment online or offline."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components import KFTUNE_IMAGE


@dsl.component(base_image=KFTUNE_IMAGE, install_kfp_package=False)
def augment(
    dataset: Input[Dataset],
    augmented: Output[Dataset],
    preview: Output[HTML],
    spec: str,
    copies: int,
    seed: int,
):
    """Applies ImageDataGenerator-style augmentation to the training split.

    Args:
        dataset: The ingested dataset.
        augmented: Output: the dataset the training steps read.
        preview: Output: originals beside their augmented variants.
        spec: YAML mapping with ImageDataGenerator's names, e.g.
            {rotation_range: 40, width_shift_range: 0.2, horizontal_flip: true,
            fill_mode: nearest}; also vertical_flip, brightness_range,
            contrast_range. Empty: no augmentation.
        copies: 0 augments online (search and fine-tune augment each training
            batch as they read it); K > 0 writes K augmented variants of every
            training image (offline). Validation and test data are never augmented.
        seed: Seeds the transforms: the same seed gives the same images.
    """
    import html

    from kftune import augment as aug
    from kftune import report
    from kftune.errors import user_errors

    with user_errors():
        parsed = aug.AugmentSpec.from_yaml(spec)
        info = aug.materialize(dataset.path, augmented.path, parsed, copies=copies, seed=seed)
    mode = "none" if parsed.is_identity else ("offline" if copies else "online")
    print(f"augment: mode={mode}, train images={info.splits['train']}")
    augmented.metadata.update({"mode": mode, "splits": info.splits, "spec": parsed.to_dict()})
    originals, variants = aug.preview_grid(dataset.path, parsed, seed=seed)
    plt = report.pyplot()
    rows, cols = variants.shape[0], variants.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            image = originals[r] if c == 0 else variants[r, c - 1]
            axes[r][c].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
            axes[r][c].axis("off")
        axes[r][0].set_title("original" if r == 0 else "", fontsize=8)
    body = f"<p>Mode: <b>{mode}</b>. Spec:</p><pre>{html.escape(spec or '(none)')}</pre>" + report.figure(fig)
    with open(preview.path, "w") as f:
        f.write(report.page("Augmentation preview", body))
