"""Augment component: validate the spec, preview it, augment online or offline."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
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
        spec: YAML mapping with ImageDataGenerator's names and meanings, e.g.
            {rotation_range: 40, width_shift_range: 0.2, height_shift_range: 0.2,
            shear_range: 0.2, zoom_range: 0.2, horizontal_flip: true,
            fill_mode: nearest}; also vertical_flip, brightness_range: [lo, hi],
            contrast_range: [lo, hi], cval. Fill modes: nearest, reflect,
            constant, wrap. Empty: no augmentation.
        copies: 0 augments online (search and fine-tune augment each training
            batch as they read it); K > 0 writes K augmented variants of every
            training image (offline). Validation and test data are never augmented.
        seed: Seeds the transforms: the same seed gives the same images.
    """
    from kftune import augment as aug
    from kftune.errors import user_errors

    with user_errors():
        parsed = aug.AugmentSpec.from_yaml(spec)
        info = aug.materialize(dataset.path, augmented.path, parsed, copies=copies, seed=seed)
    mode = "none" if parsed.is_identity else ("offline" if copies else "online")
    print(f"augment: mode={mode}, train images={info.splits['train']}")
    augmented.metadata.update({"mode": mode, "splits": info.splits, "spec": parsed.to_dict()})
    with open(preview.path, "w") as f:
        f.write(aug.preview_html(dataset.path, parsed, mode=mode, spec_text=spec, seed=seed))
