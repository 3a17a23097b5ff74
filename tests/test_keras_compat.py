"""kftune.keras_compat against the tf-keras it was written for: the private member it relies on."""

from importlib.metadata import version

import numpy as np

from kftune import keras_compat, models


def test_pinned_to_the_tf_keras_it_was_written_for():
    assert version("tf-keras").startswith(keras_compat.TF_KERAS_VERSION)


def test_downloads_are_served_from_the_file_and_restored_after(tmp_path):
    from tf_keras.src.utils import data_utils

    original = data_utils.get_file
    k = models.keras()
    source = k.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    source.save_weights(tmp_path / "base.weights.h5")
    built = keras_compat.imagenet_network_with_weights(
        k.applications.MobileNetV2, tmp_path / "base.weights.h5", include_top=False, input_shape=(32, 32, 3), alpha=0.35)
    for expected, loaded in zip(source.get_weights(), built.get_weights(), strict=True):
        np.testing.assert_array_equal(expected, loaded)
    assert data_utils.get_file is original
