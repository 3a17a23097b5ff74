"""Every use kftune makes of tf-keras' private members, in one place.

A keras.applications backbone is not always the same network with every
``weights`` value: EfficientNet adds a stem multiply (by 1/sqrt(ImageNet's
stddev)) only when ``weights="imagenet"``, because its ImageNet weights expect
it. A base saved from Keras' ImageNet model and loaded into the
``weights=None`` network gives other features (61% off, relative). So kftune
builds a backbone for a weights file exactly as Keras builds it for ImageNet,
with Keras' download served from the file: ``tf_keras.src.utils.data_utils.get_file``,
which every keras.applications module calls for its weights, returns the file
for the length of the build, and the constructor then loads it with its own
``model.load_weights``.

tests/test_keras_compat.py pins this to tf-keras 2.21 (the version
pyproject.toml allows); an upgrade that changes it fails there first.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

TF_KERAS_VERSION = "2.21"

# One build at a time may swap the download function.
_LOCK = threading.Lock()


@contextlib.contextmanager
def keras_downloads_served_from(path: str | Path):
    """Within the block, every keras.applications weights download returns ``path`` instead."""
    from tf_keras.src.utils import data_utils

    with _LOCK:
        original = data_utils.get_file
        data_utils.get_file = lambda *args, **kwargs: str(path)
        try:
            yield
        finally:
            data_utils.get_file = original


def imagenet_network_with_weights(constructor, path: str | Path, **kwargs):
    """``constructor(weights="imagenet", **kwargs)``: the ImageNet network, with the weights of the file ``path``."""
    with keras_downloads_served_from(path):
        return constructor(weights="imagenet", **kwargs)
