"""A really pretrained MobileNetV2 base for the benchmarks, from a package registry this machine reaches.

Keras' ImageNet weights cannot be downloaded here, and a base made locally (``kftune.fixtures
.make_backbone_weights``) computes near-random features whose channels all matter alike, so pruning
benchmarks on it cannot say what pruning costs a real model. The npm package nsfwjs (MIT licence) ships
the weights of a keras.applications ``MobileNetV2`` (alpha 1.0, 224 px) inside its tarball: an ImageNet
model fine-tuned to sort photos and drawings into 5 classes, saved by Keras 2.2.4 and converted for
TensorFlow.js with each tensor quantized to 8 bits (``min + scale * q``). Its base layers carry
keras.applications' own names, so they load into ``tf_keras.applications.MobileNetV2(include_top=False)``
one for one; the package's own 5-class head is dropped.

    .venv/bin/python bench/pretrained.py OUT.h5     # writes the base's weights file, prints what it holds

The model was trained on pixels scaled to 0..1 (nsfwjs divides by 255); kftune's MobileNetV2 feeds
-1..1 (``tf`` preprocessing), so the first convolution's kernel is halved and the 0.5 shift moved into
its BatchNormalization's mean (exact but for the one-pixel zero padding at the bottom and right edges).
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

PACKAGE = "nsfwjs@4.4.0"
# npm's own sha512 of the tarball (`npm view nsfwjs@4.4.0 dist.integrity`): npm checks it while fetching,
# and it is checked again here so that a cached tarball is the one these figures came from.
INTEGRITY = "sha512-krC1fgeTLXtZwgdpKJ0jm7hqv0gTSRQQRL+FhOaxaJ9Wj92t42BO3csO2odwgTAgZgf2RvkwPtp0R8Aa7dc+MA=="
MODEL = "package/dist/models/mobilenet_v2/model.min.js"
SHARD = "package/dist/models/mobilenet_v2/group1-shard1of1.min.js"
CACHE = Path.home() / ".cache" / "kftune-bench"

# One entry of the model's weights manifest as the minified JavaScript writes it.
_ENTRY = re.compile(r'\{name:"([^"]+)",shape:\[([0-9,]*)\],dtype:"float32",'
                    r'quantization:\{min:(-?[0-9.e+-]+),scale:([0-9.e+-]+),dtype:"uint8"\}\}')
_BYTES = re.compile(r'exports="([A-Za-z0-9+/=]+)"')


def tarball(cache: Path = CACHE) -> Path:
    """nsfwjs's tarball, fetched once with ``npm pack`` (npm checks its sha512) and kept in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "nsfwjs-4.4.0.tgz"
    if not path.exists():
        try:
            subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", str(cache), "--silent"], check=True,
                           stdout=subprocess.DEVNULL, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise SystemExit(f"bench/pretrained.py: `npm pack {PACKAGE}` failed ({e}): the pretrained base comes "
                             "from the npm registry; install Node.js and npm, or pass --weights local") from e
    digest = "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()
    if digest != INTEGRITY:
        raise SystemExit(f"bench/pretrained.py: {path} is not npm's {PACKAGE} (its sha512 differs); delete it to "
                         "fetch it again")
    return path


def tensors(path: Path) -> dict[str, np.ndarray]:
    """The MobileNetV2 model's tensors in the tarball, dequantized, by ``layer/weight`` name."""
    with tarfile.open(path) as tar:
        manifest = tar.extractfile(MODEL).read().decode()
        shard = tar.extractfile(SHARD).read().decode()
    entries = _ENTRY.findall(manifest)
    found = _BYTES.search(shard)
    if not entries or found is None:
        raise SystemExit(f"bench/pretrained.py: {path.name} is not laid out as nsfwjs 4.4.0 is; delete it to fetch again")
    raw = np.frombuffer(base64.b64decode(found.group(1)), np.uint8)
    out, offset = {}, 0
    for name, shape, low, scale in entries:
        dims = [int(d) for d in shape.split(",") if d]
        size = int(np.prod(dims))
        out[name] = (raw[offset:offset + size].astype(np.float32) * np.float32(scale) + np.float32(low)).reshape(dims)
        offset += size
    if offset != raw.size:
        raise SystemExit(f"bench/pretrained.py: the manifest names {offset:,} bytes of weights, the shard holds "
                         f"{raw.size:,}; delete {path} to fetch it again")
    return out


def mobilenet_v2_weights(out: str | Path, cache: Path = CACHE) -> Path:
    """Writes the pretrained base's weights for ``MobileNetV2(include_top=False, input_shape=(224, 224, 3))``
    (kftune's ``mobilenet_v2`` backbone, ``weights=<out>``). Returns ``out``."""
    import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
    from kftune import models

    values = tensors(tarball(cache))
    k = models.keras()
    base = k.applications.MobileNetV2(include_top=False, weights=None, input_shape=(224, 224, 3))
    used = set()
    for layer in base.layers:
        if layer.weights:
            names = [f"{layer.name}/{w.name.split('/')[-1].split(':')[0]}" for w in layer.weights]
            layer.set_weights([values[n] for n in names])
            used.update(names)
    left = sorted(set(values) - used)
    if any(not name.startswith("dense_") for name in left):
        raise SystemExit(f"bench/pretrained.py: tensors the base does not take: {left}")
    # 0..1 inputs -> -1..1 inputs: x01 = (x + 1) / 2, so W x01 = (W / 2) x + sum(W) / 2 per output channel.
    conv, norm = base.get_layer("Conv1"), base.get_layer("bn_Conv1")
    (kernel,) = conv.get_weights()
    gamma, beta, mean, variance = norm.get_weights()
    conv.set_weights([kernel / 2])
    norm.set_weights([gamma, beta, mean - kernel.sum(axis=(0, 1, 2)) / 2, variance])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(str(out))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    print(f"{mobilenet_v2_weights(argv[0])}: MobileNetV2 base (include_top=False, 224 px) from {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
