"""kftune's Kubeflow Pipelines components: thin adapters around the ``kftune`` core.

Each component is a lightweight Python component whose body imports kftune and
calls one core function. On a cluster it runs in one of kftune's two images (no
install at start-up); under ``kfp.local.SubprocessRunner(use_venv=False)`` it
runs in the local environment where kftune is installed.

The images (both built from images/ by ``make images``):

- ``KFTUNE_IMAGE``: TensorFlow's GPU image with kftune, for the steps that
  train or run models (search workers and result, fine-tune, prune, evaluate).
- ``KFTUNE_CPU_IMAGE``: a slim CPU image with kftune, for the light steps
  (validate, ingest, augment, export, the gate's report).

Each component names its usual image; a cluster profile's ``image: cpu|gpu``
per step overrides it (pipelines/cluster.py), so the ``cpu`` profile runs
every step on the CPU image.

Both are named ``<registry>/kftune[-cpu]:<tag>``; set ``KFTUNE_REGISTRY`` (and
``KFTUNE_TAG``) before compiling to take both from your registry (the
Makefile's IMAGE_REGISTRY and TAG do that). ``KFTUNE_IMAGE`` or
``KFTUNE_CPU_IMAGE`` override one image by its full name, e.g. an image
``FROM`` kftune's with your own model package installed.
"""

import os

KFTUNE_REGISTRY = os.environ.get("KFTUNE_REGISTRY") or "ghcr.io/kftune"
KFTUNE_TAG = os.environ.get("KFTUNE_TAG") or "0.1.0"
KFTUNE_IMAGE = os.environ.get("KFTUNE_IMAGE") or f"{KFTUNE_REGISTRY}/kftune:{KFTUNE_TAG}"
KFTUNE_CPU_IMAGE = os.environ.get("KFTUNE_CPU_IMAGE") or f"{KFTUNE_REGISTRY}/kftune-cpu:{KFTUNE_TAG}"
