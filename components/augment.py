"""Augment component: validate the spec, preview it, augment online or offline."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components import KFTUNE_CPU_IMAGE


@dsl.component(base_image=KFTUNE_CPU_IMAGE, install_kfp_package=False)
def augment(
    dataset: Input[Dataset],
    augmented: Output[Dataset],
    preview: Output[HTML],
    config: str,
):
    """Applies ImageDataGenerator-style augmentation to the training split.

    Args:
        dataset: The ingested dataset.
        augmented: Output: the dataset the training steps read.
        preview: Output: originals beside their augmented variants.
        config: The augment settings (from the validation step): augment_spec,
            augment_copies, seed.
    """
    from kftune import augment as aug
    from kftune import parameters
    from kftune.errors import user_errors

    with user_errors():
        settings = parameters.load(aug.AugmentConfig, config)
        parsed = settings.spec
        info = aug.materialize(dataset.path, augmented.path, parsed, copies=settings.augment_copies, seed=settings.seed)
    mode = "none" if parsed.is_identity else ("offline" if settings.augment_copies else "online")
    print(f"augment: mode={mode}, train images={info.splits['train']}")
    augmented.metadata.update({"mode": mode, "splits": info.splits, "spec": parsed.to_dict()})
    with open(preview.path, "w") as f:
        f.write(aug.preview_html(dataset.path, parsed, mode=mode, spec_text=settings.augment_spec, seed=settings.seed))
