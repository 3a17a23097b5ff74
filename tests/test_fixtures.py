"""The photo fixture and the locally made backbone weights: deterministic, class-structured, loadable."""

import numpy as np
import pytest

from kftune import dataset, fixtures, models
from kftune.errors import InputError


def test_photos_are_deterministic_class_folders_of_jpeg_and_png(tmp_path):
    counts = fixtures.make_photos(tmp_path / "a", 24, size=48, seed=3)
    fixtures.make_photos(tmp_path / "b", 24, size=48, seed=3)
    assert counts == dict.fromkeys(fixtures.CLASSES, 4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert {p.suffix for p in files} == {".jpg", ".png"} and len(files) == 24
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in files)
    with pytest.raises(InputError, match="is not empty"):
        fixtures.make_photos(tmp_path / "a", 24, size=48)


def test_photo_classes_differ_more_between_than_within(tmp_path):
    """Real class structure: mean colours of one class sit nearer each other than those of other classes."""
    images, labels = fixtures.photo_arrays(60, size=32)
    colours = images.reshape(len(images), -1, 3).mean(axis=1)
    centres = np.stack([colours[labels == c].mean(axis=0) for c in range(len(fixtures.CLASSES))])
    within = np.mean([np.linalg.norm(colours[i] - centres[labels[i]]) for i in range(len(images))])
    between = np.mean([np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1:]])
    assert between > 1.5 * within, (between, within)
    # And the folder ingests as any folder of photos does.
    fixtures.make_photos(tmp_path / "photos", 36, size=40)
    info = dataset.ingest(dataset.IngestConfig(source=str(tmp_path / "photos"), image_size=32), tmp_path / "data",
                          progress=lambda _: None)
    assert info.class_names == sorted(fixtures.CLASSES) and sum(info.splits.values()) == 36


def test_backbone_weights_load_and_have_measured_batchnorm_statistics(tmp_path):
    path = fixtures.make_backbone_weights(tmp_path / "base.weights.h5", "mobilenet_v2_035", size=32,
                                          calibration_images=8)
    model, base = models.backbone_classifier("mobilenet_v2_035", (32, 32, 3), 6, weights=str(path))
    norm = next(layer for layer in base.layers if type(layer).__name__ == "BatchNormalization")
    mean, variance = norm.moving_mean.numpy(), norm.moving_variance.numpy()
    assert not np.allclose(mean, 0) and not np.allclose(variance, 1), "statistics left at their initial values"
    assert model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0).shape == (2, 6)
