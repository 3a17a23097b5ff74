"""kftune: search, fine-tune, prune, augment, evaluate and export Keras image models.

The core library. It knows nothing of Kubeflow Pipelines: the components in
``components/`` are thin adapters around the functions here.

kftune uses tf-keras (the Keras 2 API) everywhere, because
tensorflow-model-optimization can only prune tf-keras models. TensorFlow picks
its Keras when it is first imported, so the switch is set here, before any
module of this package imports TensorFlow.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up chatter (oneDNN, CUDA probes) buries the progress
# lines users look for in the Kubeflow UI logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# What that setting cannot reach (absl's banners, the CUDA probe on a machine with
# no GPU driver) is filtered from the first TensorFlow import: kftune/quiet.py.
from kftune import quiet as _quiet  # noqa: E402

_quiet.install()

__version__ = "0.1.0"
