"""kftune's Kubeflow Pipelines components: thin adapters around the ``kftune`` core.

Each component is a lightweight Python component whose body imports kftune and
calls one core function. On a cluster it runs in kftune's image (no install at
start-up); under ``kfp.local.SubprocessRunner(use_venv=False)`` it runs in the
local environment where kftune is installed.

The image is the one setting to change to run from your own registry: set
``KFTUNE_IMAGE`` before compiling (``make compile KFTUNE_IMAGE=...``).
"""

import os

KFTUNE_IMAGE = os.environ.get("KFTUNE_IMAGE", "ghcr.io/kftune/kftune:0.1.0")
