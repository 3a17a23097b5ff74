"""Structured pruning: remove whole filters and units, and rebuild a smaller dense model.

tfmot's magnitude pruning sets weights to zero and keeps them: the file is as
large as before and runs as fast. Here the lowest-importance filters of Conv2D
layers and units of Dense layers (importance: the L1 norm of each one's
kernel slice) are removed, the layers that read them lose the matching inputs
(through BatchNormalization, DepthwiseConv2D with depth_multiplier 1,
pooling, padding, dropout, activations and Flatten), and the model is rebuilt
from its own config with the surviving weights. What comes out is an ordinary
Keras model, smaller and faster in any runtime, which :mod:`kftune.prune`
then fine-tunes.

A layer is left whole, and named with the reason, where removing its outputs
would change what another layer computes in a way kftune does not rewrite:
the model's output layer, layers feeding Add, Concatenate, Multiply, a nested
model, a custom layer or several layers' shared inputs. A nested model (a
frozen pretrained backbone) is kept whole, so for a backbone classifier only
the trainable head shrinks.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import models
from kftune.errors import InputError

# Layers whose output channels are their input channels, weights untouched: a removed channel passes through.
PASSTHROUGH = ("Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout2D", "GaussianNoise",
               "GaussianDropout", "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "Cropping2D", "UpSampling2D",
               "GlobalAveragePooling2D", "GlobalMaxPooling2D")
# Layers with one weight slice per channel, sliced with it.
PER_CHANNEL = ("BatchNormalization", "DepthwiseConv2D")
# Layers that read the channels and produce their own: they lose the matching inputs.
READERS = ("Conv2D", "Dense")
# Layers whose outputs can be removed.
SHRINKABLE = ("Conv2D", "Dense")


@dataclasses.dataclass
class Plan:
    """What shrinking does to each layer with a kernel: ``keep`` (indices kept) or ``whole`` (reason)."""

    keep: dict[str, np.ndarray]
    widths: dict[str, int]
    units: dict[str, str]  # "filters" or "units"
    whole: dict[str, str]
    # Per shrunk layer: the per-channel layers and the (reader, Flatten between or "") its outputs reach.
    reach: dict[str, tuple[list[str], list[tuple[str, str]]]]

    def describe(self) -> dict[str, str]:
        """One line per layer: what it got."""
        out = {name: f"structured: {self.widths[name]} -> {len(kept)} {self.units[name]}"
               for name, kept in self.keep.items()}
        out.update({name: f"left whole: {reason}" for name, reason in self.whole.items()})
        return out


@dataclasses.dataclass
class _Graph:
    """A model's top-level layers as its config wires them (Sequential or functional alike)."""

    config: dict
    entries: dict[str, dict]  # layer name -> its dict in config["layers"]
    order: list[str]
    consumers: dict[str, list[str]]
    outputs: set[str]
    shared: set[str]  # layers called more than once


def _graph(model) -> _Graph:
    k = models.keras()
    if isinstance(model, k.Sequential):
        config = copy.deepcopy(model.get_config())
        entries = {e["config"]["name"]: e for e in config["layers"]}
        order = list(entries)
        consumers = {a: [b] for a, b in zip(order, order[1:], strict=False)}
        return _Graph(config, entries, order, consumers, {order[-1]}, set())
    if not getattr(model, "_is_graph_network", False):
        raise InputError(
            f"model `{model.name}` ({type(model).__name__}) is a subclassed Keras model, which structured pruning "
            "cannot rebuild from its config: build it as a Sequential or functional model, or use "
            "prune_method=magnitude.")
    config = copy.deepcopy(model.get_config())
    entries = {e["name"]: e for e in config["layers"]}
    consumers: dict[str, list[str]] = {name: [] for name in entries}
    shared = set()
    for name, entry in entries.items():
        nodes = entry.get("inbound_nodes") or []
        if len(nodes) > 1:
            shared.add(name)
        for node in nodes:
            for source in _sources(node):
                consumers.setdefault(source, []).append(name)
    outputs = {out[0] for out in config["output_layers"]}
    return _Graph(config, entries, list(entries), consumers, outputs, shared)


def consumers(model) -> dict[str, list[str]]:
    """The layers that read each top-level layer's output, by name (Sequential or functional)."""
    return _graph(model).consumers


def _sources(node) -> list[str]:
    """The layer names a config node reads (tf-keras' ``[[name, node, tensor, kwargs], ...]``)."""
    return [item[0] for item in node if isinstance(item, list | tuple) and item and isinstance(item[0], str)]


def _trace(graph: _Graph, layers: dict, start: str) -> tuple[list[str], list[tuple[str, str]], str | None]:
    """Follows ``start``'s outputs forward: (per-channel layers, (reader, via Flatten or "") pairs, blocker)."""
    per_channel, readers = [], []
    stack = [(c, "") for c in graph.consumers.get(start, [])]
    if start in graph.outputs:
        return [], [], "it is the model's output"
    while stack:
        name, via = stack.pop()
        kind = type(layers[name]).__name__
        if name in graph.shared:
            return [], [], f"it feeds `{name}`, which is called more than once"
        if kind in READERS:
            readers.append((name, via))
            continue
        if name in graph.outputs:
            return [], [], f"its channels reach the model's output through `{name}`"
        if kind == "Flatten":
            if via:
                return [], [], f"it is flattened twice before `{name}`"
            via = name
        elif kind in PER_CHANNEL:
            layer = layers[name]
            if via or (kind == "DepthwiseConv2D" and layer.depth_multiplier != 1) or \
                    (kind == "BatchNormalization" and layer.axis not in ([-1], [3], [len(layer.input_shape) - 1])):
                return [], [], f"it feeds `{name}` ({kind}), whose channels kftune does not slice"
            per_channel.append(name)
        elif kind not in PASSTHROUGH:
            return [], [], f"it feeds `{name}` ({kind}), which structured pruning does not rewrite"
        stack.extend((c, via) for c in graph.consumers.get(name, []))
    return per_channel, readers, None


def _importance(layer) -> np.ndarray:
    """L1 norm of each output's kernel slice."""
    kernel = layer.kernel.numpy()
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)


def plan(model, fraction: float, layer_types: list[str] | None = None) -> tuple[Plan, _Graph]:
    """Which outputs of which layers to keep when removing ``fraction`` of each shrinkable layer's outputs."""
    k = models.keras()
    graph = _graph(model)
    layers = {layer.name: layer for layer in model.layers}
    if isinstance(model, k.Sequential) and graph.order[0] not in layers:
        layers[graph.order[0]] = None  # the InputLayer entry of a Sequential config
    keep, widths, units, whole, reach = {}, {}, {}, {}, {}
    for name in graph.order:
        layer = layers.get(name)
        if layer is None or not layer.weights:
            continue
        kind = type(layer).__name__
        if isinstance(layer, k.Model):
            whole[name] = "a nested model (pretrained base): kept whole"
            continue
        if kind not in SHRINKABLE:
            if kind not in PER_CHANNEL:
                whole[name] = f"{kind} is not a layer kind structured pruning shrinks"
            continue
        if layer_types and kind not in layer_types:
            whole[name] = f"{kind} is not in prune_layer_types"
            continue
        if kind == "Conv2D" and (layer.groups != 1 or layer.data_format != "channels_last"):
            whole[name] = "a grouped or channels_first Conv2D"
            continue
        per_channel, readers, blocker = _trace(graph, layers, name)
        if blocker is None and not readers:
            blocker = "no Conv2D or Dense reads its outputs"
        if blocker:
            whole[name] = blocker
            continue
        width = int(layer.kernel.shape[-1])
        count = max(1, int(round(width * (1.0 - fraction))))
        keep[name] = np.sort(np.argsort(-_importance(layer), kind="stable")[:count])
        widths[name] = width
        units[name] = "filters" if kind == "Conv2D" else "units"
        reach[name] = (per_channel, readers)
    return Plan(keep, widths, units, whole, reach), graph


def shrink(model, fraction: float, layer_types: list[str] | None = None):
    """A new, smaller model without ``fraction`` of each shrinkable layer's outputs. Returns (model, plan)."""
    k = models.keras()
    the_plan, graph = plan(model, fraction, layer_types)
    layers = {layer.name: layer for layer in model.layers}
    weights = {name: layer.get_weights() for name, layer in layers.items()}
    for name, kept in the_plan.keep.items():
        per_channel, readers = the_plan.reach[name]
        entry = graph.entries[name]["config"]
        entry["filters" if "filters" in entry else "units"] = len(kept)
        weights[name] = _slice_outputs(weights[name], kept)
        for other in per_channel:
            weights[other] = [w[..., kept, :] if w.ndim == 4 else w[kept] for w in weights[other]]
        for reader, via in readers:
            rows = kept
            if via:
                height_width = int(np.prod(layers[via].input_shape[1:-1]))
                channels = int(layers[via].input_shape[-1])
                rows = (np.arange(height_width)[:, None] * channels + kept[None, :]).ravel()
            kernel, *rest = weights[reader]
            weights[reader] = [kernel[..., rows, :], *rest]
    for entry in graph.config["layers"]:
        entry.pop("build_config", None)  # input shapes change; every layer is built when called again
    custom = {type(layer).__name__: type(layer) for layer in model.layers}
    with k.utils.custom_object_scope(custom):
        rebuilt = type(model).from_config(graph.config) if isinstance(model, k.Sequential) else \
            k.Model.from_config(graph.config)
    for layer in rebuilt.layers:
        if layer.name in weights and weights[layer.name]:
            layer.set_weights(weights[layer.name])
        layer.trainable = layers[layer.name].trainable if layer.name in layers else layer.trainable
    return rebuilt, the_plan


def _slice_outputs(values: list, kept: np.ndarray) -> list:
    kernel, *rest = values
    return [kernel[..., kept], *[w[kept] for w in rest]]
