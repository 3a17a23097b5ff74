"""Measuring models: size on disk (raw and compressed), sparsity, parameters, latency.

A pruned model is exactly as large on disk as the dense one: pruning sets
weights to zero but keeps them. The saving appears once the file is compressed
(zeros compress well) or in a runtime that stores sparse tensors, which is why
every size kftune reports comes in two: raw and gzip-compressed.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import time
from pathlib import Path


@dataclasses.dataclass
class Size:
    raw_bytes: int
    gzip_bytes: int


def file_size(path: str | os.PathLike) -> Size:
    """Raw and gzip-compressed size of a file, or of all files under a folder."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    raw = gzipped = 0
    for f in files:
        data = f.read_bytes()
        raw += len(data)
        gzipped += len(gzip.compress(data, compresslevel=9))
    return Size(raw, gzipped)


def sparsity(model) -> dict[str, float]:
    """Share of exact zeros in each layer's kernel, and ``overall`` over all kernels.

    Biases and BatchNormalization statistics are left out, as tfmot leaves them unpruned.
    """
    import numpy as np

    per_layer, zeros, total = {}, 0, 0
    for layer in _leaf_layers(model):
        kernels = [w for w in layer.weights if "kernel" in w.name and "bias" not in w.name]
        if not kernels:
            continue
        values = np.concatenate([w.numpy().ravel() for w in kernels])
        per_layer[layer.name] = float(np.mean(values == 0))
        zeros += int(np.sum(values == 0))
        total += values.size
    per_layer["overall"] = zeros / total if total else 0.0
    return per_layer


def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _leaf_layers(layer)
        else:
            yield layer


def latency_ms(model, images, *, batch_size: int, repeats: int = 20) -> float:
    """Median milliseconds for one forward pass over ``batch_size`` images (after warm-up)."""
    import numpy as np
    import tensorflow as tf

    batch = tf.constant(np.resize(images, (batch_size, *images.shape[1:])).astype(np.float32))
    infer = tf.function(lambda x: model(x, training=False))
    infer(batch)  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        infer(batch).numpy()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))
