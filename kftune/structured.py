"""Structured pruning of whole models: remove groups of channels, rebuild a smaller dense model.

tfmot's magnitude pruning sets weights to zero and keeps them: the file is as
large as before and runs as fast. Here whole channels go, and the model is
rebuilt from its own config with the surviving weights: an ordinary Keras
model, smaller and faster in any runtime, which :mod:`kftune.prune` then
fine-tunes.

Channels cannot be removed one layer at a time where layers share them: the
two inputs of an Add, a depthwise convolution and the BatchNormalization around
it, the squeeze-excite product of EfficientNet. As Torch-Pruning's dependency
graph (DepGraph, CVPR 2023) does for PyTorch, kftune reads the model's graph
once, with nested models (a keras.applications base) flattened into it, and
finds the *groups*: sets of channels that must go together. A group has

- producers, the Conv2D and Dense layers whose outputs are its channels (the
  block's expand convolution and its squeeze-excite expand convolution are one
  group, as are every convolution feeding one chain of residual Adds);
- per-channel layers that are sliced with it (BatchNormalization,
  DepthwiseConv2D with depth_multiplier 1, the target shape of a Reshape);
- readers, the Conv2D and Dense layers that lose the matching input rows
  (through Concatenate and Flatten by index mapping).

Activations, pooling, padding, cropping, resizing, dropout, scalar Rescaling,
GlobalPooling and channel-preserving Reshape pass channels through; Add,
Subtract, Multiply, Average, Maximum and Minimum join their inputs' groups.

Importance (stated, one criterion): where the group holds BatchNormalization
layers, each channel's |gamma| (Network Slimming's BN scale); otherwise the L1
norm of each producer's kernel slice. Each layer's scores are divided by their
mean so that no layer dominates by its scale, then summed over the group. The
lowest-scoring ``fraction`` of each group's channels is removed, or, with shares
from :func:`allocate`, a share of each group set by its measured sensitivity
(:func:`sensitivity`: how much removing that share alone changes the model's
outputs), so that ``fraction`` of all channels go where they cost least.

Removing channels drops what they carried into their readers. :func:`reconstruct` then refits each
layer that lost input channels, by least squares on a few training images, so that it computes from the
channels it still reads what it computed from all of them (channel pruning's reconstruction, He et al.
2017): the shrunk model starts from the original's function rather than from a damaged one.

A group is left whole, with the reason in the plan, where it reaches the
model's output or input, where a producer is excluded by ``prune_layer_types``,
or where it touches a layer whose channel semantics kftune does not know
(a custom layer, LayerNormalization, a softmax over channels, a grouped
convolution, ...). Such a layer is named; the rest of the model still shrinks.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import numpy as np

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import models
from kftune.errors import InputError

# Layers whose output channels are their input channels, without weights: a removed channel passes through.
PASSTHROUGH = ("Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "ThresholdedReLU", "Dropout", "SpatialDropout2D",
               "GaussianNoise", "GaussianDropout", "AlphaDropout", "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D",
               "Cropping2D", "UpSampling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Resizing",
               "ActivityRegularization")
# Layers with a constant per channel in their config (input preprocessing): channels pass, but stay whole.
PINNED = ("CaffePreprocess", "Normalization")
# Layers joining their inputs channel by channel: their inputs' channels are one group.
ELEMENTWISE = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
# Layers that produce channels of their own and read their inputs' channels.
PRODUCERS = ("Conv2D", "Dense")
# Activations that mix channels: a producer with one cannot lose outputs without changing the others.
MIXING = ("softmax", "log_softmax")
IMPORTANCE = ("BatchNormalization |gamma| where the group has one, else the L1 norm of each producer's kernel "
              "slice; each layer's scores divided by their mean, summed over the group")


# BatchNorm scales that differ by less than this share of their mean rank nothing: they are where they were
# initialised (1.0), i.e. the base was never trained (weights=None, or weights made locally).
UNRANKED_SPREAD = 0.01
UNRANKED = "BN scales all alike, as in an untrained base: channels not ranked"
# The shares of a group's channels whose removal :func:`sensitivity` measures, and the most :func:`allocate` gives.
SENSITIVITY_LEVELS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
SENSITIVE = "kept whole: removing even the least share changes the outputs most"


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a tensor's last-axis channels come from: segments (space, width) in order, repeated ``repeat``
    times (``repeat`` > 1 after Flatten: the channels of each spatial position in turn)."""

    segments: tuple[tuple[int, int], ...]
    repeat: int = 1

    @property
    def width(self) -> int:
        return sum(w for _, w in self.segments) * self.repeat

    @property
    def simple(self) -> bool:
        return len(self.segments) == 1 and self.repeat == 1


class _Spaces:
    """Channel spaces joined into groups (union-find), each with its producers and reasons to stay whole."""

    def __init__(self):
        self.parent: list[int] = []
        self.width: list[int] = []
        self.reasons: list[list[str]] = []
        self.producers: list[list[str]] = []

    def new(self, width: int, producer: str | None = None, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.width.append(int(width))
        self.reasons.append([reason] if reason else [])
        self.producers.append([producer] if producer else [])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.reasons[a] += self.reasons[b]
            self.producers[a] += self.producers[b]
        return a

    def block(self, layout: _Layout, reason: str) -> None:
        for s, _ in layout.segments:
            root = self.find(s)
            if reason not in self.reasons[root]:
                self.reasons[root].append(reason)


@dataclasses.dataclass
class Group:
    """Channels that go together: ``keep`` (indices kept) or None where the group stays whole (``why``)."""

    producers: list[str]
    members: list[str]  # per-channel layers sliced with the group
    readers: list[str]
    width: int
    keep: np.ndarray | None
    why: str
    # "BN |gamma|" or "kernel L1" where channels were ranked; unranked: the scores were all alike (UNRANKED).
    criterion: str = ""
    unranked: bool = False

    @property
    def block(self) -> str:
        """The name the group's producers share up to their last ``_`` part (MobileNetV2's ``block_3``,
        EfficientNet's ``block2a``), or the first producer's name."""
        names = sorted(self.producers)
        common = names[0]
        for name in names[1:]:
            while not name.startswith(common):
                common = common[:-1]
        common = common.rstrip("_")
        return common if len(common) >= 3 else names[0]


@dataclasses.dataclass
class Plan:
    """The groups the graph holds, what each keeps, and the layers the analysis does not know."""

    groups: list[Group]
    unknown: dict[str, str]  # layer -> why it is left whole
    units: dict[str, str]  # producer -> "filters" or "units"
    # Per per-channel layer, once shrunk: the indices of the original channels it keeps.
    member_rows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def keep(self) -> dict[str, np.ndarray]:
        """Per producer of a shrunk group: the output indices kept."""
        return {p: g.keep for g in self.groups if g.keep is not None for p in g.producers}

    @property
    def widths(self) -> dict[str, int]:
        return {p: g.width for g in self.groups for p in g.producers}

    @property
    def whole(self) -> dict[str, str]:
        """Per producer of a group left whole, and per unknown layer: why."""
        out = {p: g.why for g in self.groups if g.keep is None for p in g.producers}
        out.update(self.unknown)
        return out

    def describe(self) -> dict[str, str]:
        """One line per layer with a kernel or left whole: what it got."""
        out = {}
        for g in self.groups:
            for p in g.producers:
                out[p] = (f"structured: {g.width} -> {len(g.keep)} {self.units[p]}" if g.keep is not None
                          else f"left whole: {g.why}")
        out.update({name: f"left whole: {reason}" for name, reason in self.unknown.items()})
        return out

    @property
    def unranked(self) -> list[str]:
        """The blocks whose channels the importance criterion could not tell apart (see UNRANKED)."""
        return [g.block for g in self.groups if g.unranked]

    def blocks(self) -> list[list]:
        """Per group, in graph order: [block, producers, channels kept, why]: the prune report's table."""
        rows = []
        for g in self.groups:
            kept = f"{len(g.keep)} of {g.width}" if g.keep is not None else f"{g.width} of {g.width}"
            rows.append([g.block, ", ".join(g.producers), kept, g.why])
        return rows


@dataclasses.dataclass
class Graph:
    """A model as one flat functional config (nested functional models inlined) and its leaf layers by name."""

    config: dict
    layers: dict[str, object]  # flat name -> the original layer object (weights, shapes)
    sequential: bool = False


def _refs(node) -> list[list]:
    """The [name, node, tensor, kwargs] entries of a config node (tf-keras' list format)."""
    return [item for item in node if isinstance(item, list | tuple) and item and isinstance(item[0], str)]


def _flatten(config: dict, model) -> tuple[dict, dict[str, object]]:
    """``config`` with every nested functional model called once replaced by its own layers."""
    k = models.keras()
    layers: dict[str, object] = {}
    out_layers = []
    taken = {e["name"] for e in config["layers"]}
    remap: dict[str, list] = {}  # nested model name -> its output refs in the flat graph

    def fix(ref):
        if ref[0] in remap:
            name, node, tensor = remap[ref[0]][ref[2]]
            return [name, node, tensor, *ref[3:]] if len(ref) > 3 else [name, node, tensor]
        return ref

    for entry in config["layers"]:
        layer = model.get_layer(entry["name"])
        for node in entry.get("inbound_nodes") or []:
            node[:] = [fix(r) if isinstance(r, list) and r and isinstance(r[0], str) else r for r in node]
        nested = isinstance(layer, k.Model) and "layers" in entry["config"] and "input_layers" in entry["config"] \
            and not isinstance(layer, k.Sequential) and len(entry.get("inbound_nodes") or []) == 1
        if not nested:
            out_layers.append(entry)
            layers[entry["name"]] = layer
            continue
        inner, inner_layers = _flatten(copy.deepcopy(entry["config"]), layer)
        outer_refs = _refs(entry["inbound_nodes"][0])
        sources = [r[:3] for r in outer_refs]
        call_kwargs = next((r[3] for r in outer_refs if len(r) > 3 and isinstance(r[3], dict)), {})
        inputs = {ref[0]: sources[i] for i, ref in enumerate(inner["input_layers"])}
        rename = {}
        for e in inner["layers"]:
            if e["name"] in inputs:
                continue
            new = e["name"] if e["name"] not in taken else f"{entry['name']}_{e['name']}"
            taken.add(new)
            rename[e["name"]] = new
        for e in inner["layers"]:
            if e["name"] in inputs:
                continue
            for node in e.get("inbound_nodes") or []:
                for i, r in enumerate(node):
                    if isinstance(r, list) and r and isinstance(r[0], str):
                        node[i] = [*inputs[r[0]], {}] if r[0] in inputs else [rename[r[0]], *r[1:]]
                if "training" in call_kwargs:
                    _pass_training(node, call_kwargs["training"], inner_layers[e["name"]])
            old = e["name"]
            e["name"] = e["config"]["name"] = rename[old]
            out_layers.append(e)
            layers[rename[old]] = inner_layers[old]
        remap[entry["name"]] = [[rename.get(n, n), node, t] if n not in inputs else inputs[n]
                                for n, node, t in (r[:3] for r in inner["output_layers"])]
    config["layers"] = out_layers
    config["output_layers"] = [fix(r) for r in config["output_layers"]]
    return config, layers


def _pass_training(node: list, training, layer) -> None:
    """Gives one inner layer's call the ``training`` value its nested model was called with.

    A keras.applications base is called as ``base(x, training=False)`` so that
    its BatchNormalization runs in inference mode even where the base trains
    (Keras' transfer-learning guide). Inlined, its layers would follow the outer
    call instead: in ``fit`` the BatchNormalization layers would normalize with
    batch statistics and move their stored ones, and the pruned model would
    predict garbage after fine-tuning. So each inner layer whose call takes
    ``training`` keeps the value, as it had inside the base.
    """
    if "training" not in inspect.signature(layer.call).parameters:
        return
    for r in node:
        if isinstance(r, list) and r and isinstance(r[0], str):
            if len(r) < 4 or not isinstance(r[3], dict):
                r[3:] = [{}]
            r[3] = {**r[3], "training": training}


def graph(model) -> Graph:
    """The model's flat graph (Sequential, functional, nested functional bases inlined)."""
    k = models.keras()
    if isinstance(model, k.Sequential):
        config = copy.deepcopy(model.get_config())
        entries = config["layers"]
        names = [e["config"]["name"] for e in entries]
        layers = {name: layer for name, layer in zip(names[1:], model.layers, strict=False)} \
            if entries and entries[0]["class_name"] == "InputLayer" else dict(zip(names, model.layers, strict=False))
        if len(layers) != len(model.layers):
            raise InputError(f"Sequential model `{model.name}` has no Input layer: build it with keras.Input(shape) "
                             "first, so that structured pruning can read its shapes.")
        flat = {"name": model.name, "layers": [], "input_layers": [[names[0], 0, 0]],
                "output_layers": [[names[-1], 0, 0]]}
        for i, e in enumerate(entries):
            flat["layers"].append({"class_name": e["class_name"], "config": e["config"], "name": names[i],
                                   "inbound_nodes": [[[names[i - 1], 0, 0, {}]]] if i else []})
        layers[names[0]] = None
        return Graph(flat, layers, sequential=True)
    if not getattr(model, "_is_graph_network", False):
        raise InputError(
            f"model `{model.name}` ({type(model).__name__}) is a subclassed Keras model, which structured pruning "
            "cannot rebuild from its config: build it as a Sequential or functional model, or use "
            "prune_method=magnitude.")
    config, layers = _flatten(copy.deepcopy(model.get_config()), model)
    return Graph(config, layers)


def _consumers(config: dict) -> dict[str, list[str]]:
    """The layers that read each layer's output, by name, in a functional config (flat or not)."""
    out: dict[str, list[str]] = {e["name"]: [] for e in config["layers"]}
    for e in config["layers"]:
        for node in e.get("inbound_nodes") or []:
            for ref in _refs(node):
                out.setdefault(ref[0], []).append(e["name"])
    return out


def consumers(model) -> dict[str, list[str]]:
    """The layers that read each top-level layer's output, by name (Sequential or functional)."""
    k = models.keras()
    if isinstance(model, k.Sequential):
        names = [layer.name for layer in model.layers]
        return {a: [b] for a, b in zip(names, names[1:], strict=False)}
    if not getattr(model, "_is_graph_network", False):
        raise InputError(f"model `{model.name}` ({type(model).__name__}) is a subclassed Keras model: "
                         "build it as a Sequential or functional model.")
    return _consumers(model.get_config())


def _channels_last(layer) -> bool:
    axis = getattr(layer, "axis", -1)
    axis = axis[0] if isinstance(axis, list | tuple) and len(axis) == 1 else axis
    rank = len(layer.input_shape) if not isinstance(layer.input_shape, list) else 0
    return axis == -1 or (rank and axis == rank - 1)


@dataclasses.dataclass
class _Analysis:
    spaces: _Spaces
    producers: dict[str, int]  # producer -> its output space
    members: dict[str, _Layout]  # per-channel layer -> the layout it is sliced by
    readers: dict[str, _Layout]  # reader -> its input layout
    reshapes: dict[str, _Layout]
    unknown: dict[str, str]
    order: list[str]


def _analyse(g: Graph, layer_types: list[str] | None) -> _Analysis:
    spaces = _Spaces()
    outputs: dict[str, list[_Layout]] = {}
    producers, members, readers, reshapes, unknown, order = {}, {}, {}, {}, {}, []
    model_outputs = {r[0] for r in g.config["output_layers"]}
    model_inputs = {r[0] for r in g.config["input_layers"]}
    for entry in g.config["layers"]:
        name, kind = entry["name"], entry["class_name"]
        layer = g.layers.get(name)
        order.append(name)
        nodes = entry.get("inbound_nodes") or []
        ins = [outputs[r[0]][r[2]] for r in _refs(nodes[0])] if nodes else []
        widths = _output_widths(layer) if layer is not None else [int(entry["config"]["batch_input_shape"][-1])]
        if kind == "InputLayer" or name in model_inputs:
            outputs[name] = [_Layout(((spaces.new(w, reason="they are the model's input"), w),)) for w in widths]
            continue

        def unknown_layer(why: str, name=name, ins=ins, widths=widths):
            unknown[name] = why
            for layout in ins:
                spaces.block(layout, f"they reach `{name}`, which is left whole ({why})")
            return [_Layout(((spaces.new(w, reason=f"`{name}` is left whole ({why})"), w),)) for w in widths]

        out = None
        if len(nodes) > 1:
            out = unknown_layer("it is called more than once")
        elif kind in PRODUCERS:
            if kind == "Conv2D" and (layer.groups != 1 or layer.data_format != "channels_last"):
                out = unknown_layer("a grouped or channels_first Conv2D")
            else:
                for layout in ins:
                    readers[name] = layout
                reason = None
                if layer_types and kind not in layer_types:
                    reason = f"{kind} is not in prune_layer_types"
                elif name not in model_outputs and getattr(layer, "activation", None) is not None \
                        and layer.activation.__name__ in MIXING:
                    reason = f"`{name}`'s {layer.activation.__name__} mixes its outputs"
                producers[name] = spaces.new(widths[0], name, reason)
                out = [_Layout(((producers[name], widths[0]),))]
        elif kind == "DepthwiseConv2D":
            if layer.depth_multiplier != 1 or layer.data_format != "channels_last":
                out = unknown_layer("a DepthwiseConv2D with depth_multiplier > 1 or channels_first")
            else:
                members[name], out = ins[0], [ins[0]]
        elif kind == "BatchNormalization":
            if not _channels_last(layer):
                out = unknown_layer("BatchNormalization over another axis than the channels")
            else:
                members[name], out = ins[0], [ins[0]]
        elif kind in PASSTHROUGH:
            activation = entry["config"].get("activation")
            if kind == "Activation" and activation in MIXING:
                out = unknown_layer(f"a {activation} over the channels")
            else:
                out = [ins[0]]
        elif kind in PINNED or kind == "Rescaling":
            scalar = kind == "Rescaling" and all(np.ndim(entry["config"].get(key, 0.0)) == 0 for key in ("scale", "offset"))
            if not scalar:
                spaces.block(ins[0], f"`{name}` ({kind}) holds a constant per channel")
            out = [ins[0]]
        elif kind == "Reshape":
            target = entry["config"]["target_shape"]
            if ins[0].repeat == 1 and target and target[-1] == ins[0].width:
                reshapes[name], out = ins[0], [ins[0]]
            else:
                out = unknown_layer("a Reshape that moves the channel axis")
        elif kind == "Flatten":
            layout = ins[0]
            if layout.repeat != 1:
                out = unknown_layer("flattened twice")
            else:
                positions = int(np.prod(layer.input_shape[1:-1])) if len(layer.input_shape) > 2 else 1
                out = [_Layout(layout.segments, positions)]
        elif kind in ELEMENTWISE:
            if all(layout.simple for layout in ins) and len({layout.width for layout in ins}) == 1:
                root = ins[0].segments[0][0]
                for layout in ins[1:]:
                    root = spaces.union(root, layout.segments[0][0])
                out = [ins[0]]
            elif len(set(ins)) == 1:
                out = [ins[0]]
            else:
                out = unknown_layer(f"{kind} of inputs of different widths or concatenated inputs")
        elif kind == "Concatenate":
            rank = len(layer.output_shape)
            if entry["config"].get("axis", -1) not in (-1, rank - 1) or any(layout.repeat != 1 for layout in ins):
                out = unknown_layer("a Concatenate along another axis than the channels")
            else:
                out = [_Layout(tuple(s for layout in ins for s in layout.segments))]
        else:
            out = unknown_layer(f"{kind} is not a layer kind structured pruning knows")
        outputs[name] = out
        if name in model_outputs:
            for layout in out:
                spaces.block(layout, f"they are the model's output (`{name}`)")
    return _Analysis(spaces, producers, members, readers, reshapes, unknown, order)


def _output_widths(layer) -> list[int]:
    shape = layer.output_shape
    shapes = shape if isinstance(shape, list) else [shape]
    return [int(s[-1]) if s and s[-1] is not None else 0 for s in shapes]


def _scores(values: np.ndarray) -> np.ndarray:
    return values / max(float(values.mean()), 1e-12)


def _importance(g: Graph, producers: list[str], bns: list[str]) -> np.ndarray:
    if bns:
        return sum(_scores(np.abs(g.layers[b].gamma.numpy())) for b in bns)
    total = 0
    for p in producers:
        kernel = g.layers[p].kernel.numpy()
        total = total + _scores(np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0))
    return total


def plan(model, fraction: float, layer_types: list[str] | None = None,
         shares: dict[str, float] | None = None) -> tuple[Plan, Graph]:
    """The groups of ``model`` and which channels of each to keep when removing ``fraction`` of every group,
    or, with ``shares`` (:func:`allocate`), that share of each group named by its first producer."""
    g = graph(model)
    return _plan(g, _analyse(g, layer_types), fraction, shares), g


def _plan(g: Graph, a: _Analysis, fraction: float, shares: dict[str, float] | None = None) -> Plan:
    spaces = a.spaces
    by_root: dict[int, list[str]] = {}
    for name in a.order:
        if name in a.producers:
            by_root.setdefault(spaces.find(a.producers[name]), []).append(name)

    def in_group(layouts: dict[str, _Layout], root: int) -> list[str]:
        return [n for n, layout in layouts.items() if any(spaces.find(s) == root for s, _ in layout.segments)]

    groups, units = [], {}
    for root, names in by_root.items():
        width = spaces.width[root]
        members = in_group(a.members, root)
        group_readers = in_group(a.readers, root)
        reasons = spaces.reasons[root]
        for p in names:
            units[p] = "filters" if type(g.layers[p]).__name__ == "Conv2D" else "units"
        if not reasons and not group_readers:
            reasons = ["no Conv2D or Dense reads them"]
        if reasons:
            groups.append(Group(names, members, group_readers, width, None, "; ".join(reasons)))
            continue
        bns = [m for m in members if type(g.layers[m]).__name__ == "BatchNormalization" and g.layers[m].scale]
        share = fraction if shares is None else shares.get(names[0], 0.0)
        count = max(1, int(round(width * (1.0 - share))))
        scores = _importance(g, names, bns)
        keep = np.sort(np.argsort(-scores, kind="stable")[:count])
        criterion = "BN |gamma|" if bns else "kernel L1"
        why = f"lowest {width - count} by {criterion} removed" if count < width else "nothing removed at this fraction"
        if shares is not None:
            why += f"; {SENSITIVE}" if count == width else f"; {share:.0%} by sensitivity"
        unranked = bool(bns) and count < width and float(np.std(scores)) < UNRANKED_SPREAD * float(np.mean(scores))
        if unranked:
            why += f" ({UNRANKED})"
        groups.append(Group(names, members, group_readers, width, keep, why, criterion, unranked))
    return Plan(groups, a.unknown, units)


def _rows(layout: _Layout, kept: dict[int, np.ndarray], spaces: _Spaces) -> np.ndarray:
    """The input indices a reader keeps of ``layout``."""
    channels = sum(w for _, w in layout.segments)
    per_position, offset = [], 0
    for s, w in layout.segments:
        per_position.append(offset + kept.get(spaces.find(s), np.arange(w)))
        offset += w
    one = np.concatenate(per_position)
    return (np.arange(layout.repeat)[:, None] * channels + one[None, :]).ravel()


def shrink(model, fraction: float, layer_types: list[str] | None = None, shares: dict[str, float] | None = None):
    """A new, smaller model without ``fraction`` of every prunable group's channels (or, with ``shares``,
    that share of each group: :func:`allocate`). Returns (model, plan)."""
    k = models.keras()
    g = graph(model)
    a = _analyse(g, layer_types)
    the_plan = _plan(g, a, fraction, shares)
    kept = {a.spaces.find(a.producers[grp.producers[0]]): grp.keep for grp in the_plan.groups if grp.keep is not None}
    config = copy.deepcopy(g.config)
    entries = {e["name"]: e for e in config["layers"]}
    weights = {name: layer.get_weights() for name, layer in g.layers.items() if layer is not None}
    for name, space in a.producers.items():
        root = a.spaces.find(space)
        if root in kept:
            entries[name]["config"]["filters" if "filters" in entries[name]["config"] else "units"] = len(kept[root])
            kernel, *rest = weights[name]
            weights[name] = [kernel[..., kept[root]], *[w[kept[root]] for w in rest]]
    for name, layout in a.readers.items():
        rows = _rows(layout, kept, a.spaces)
        kernel, *rest = weights[name]
        weights[name] = [kernel[..., rows, :], *rest]
    for name, layout in a.members.items():
        rows = the_plan.member_rows[name] = _rows(layout, kept, a.spaces)
        if type(g.layers[name]).__name__ == "DepthwiseConv2D":
            kernel, *rest = weights[name]
            weights[name] = [kernel[:, :, rows, :], *[w[rows] for w in rest]]
        else:
            weights[name] = [w[rows] for w in weights[name]]
    for name, layout in a.reshapes.items():
        target = list(entries[name]["config"]["target_shape"])
        target[-1] = len(_rows(layout, kept, a.spaces))
        entries[name]["config"]["target_shape"] = target
    for entry in config["layers"]:
        entry.pop("build_config", None)  # input shapes change; every layer is built when called again
    custom = {type(layer).__name__: type(layer) for layer in g.layers.values() if layer is not None}
    with k.utils.custom_object_scope(custom):
        if g.sequential:
            seq = copy.deepcopy(model.get_config())
            seq["layers"] = [{**e, "config": entries[e["config"]["name"]]["config"]} for e in seq["layers"]]
            for e in seq["layers"]:
                e.pop("build_config", None)
            rebuilt = type(model).from_config(seq)
        else:
            rebuilt = k.Model.from_config(config)
    for layer in rebuilt.layers:
        if weights.get(layer.name):
            layer.set_weights(weights[layer.name])
        if g.layers.get(layer.name) is not None:
            layer.trainable = g.layers[layer.name].trainable
    return rebuilt, the_plan


def unfreeze_shrunk(model, the_plan: Plan) -> None:
    """Makes every layer a shrunk group touched trainable, BatchNormalization excepted.

    A frozen pretrained base that lost channels must recover in training; its
    BatchNormalization layers keep their setting, and those of a base called
    with training=False keep running in inference mode with the original
    statistics (means moved by :func:`reconstruct`'s intercepts), as the base
    did (:func:`_pass_training`).
    Layers no shrunk group touched keep their setting.
    """
    k = models.keras()
    touched = {n for g in the_plan.groups if g.keep is not None for n in (*g.producers, *g.members, *g.readers)}
    for layer in model.layers:
        if layer.name in touched and not isinstance(layer, k.layers.BatchNormalization):
            layer.trainable = True


# Least-squares refit of the layers that lost input channels (reconstruct): rows sampled per layer, and the
# ridge that pulls each refit kernel toward the original's rows, relative to the mean input energy (a Dense
# layer after global pooling sees one row per image, fewer than its inputs).
RECONSTRUCT_SAMPLES = 20_000
RECONSTRUCT_RIDGE = 1e-3
# The widest input a refit solves for (VGG16's 3x3x512 patches): a Dense layer after Flatten can read 25,088
# inputs, whose normal equations would take 5 GB and hours; such a layer keeps its kept rows as they are.
RECONSTRUCT_MAX_INPUTS = 4608


@dataclasses.dataclass(frozen=True)
class Refit:
    """One layer :func:`reconstruct` refit: the relative squared error of its (pre-activation) outputs against
    the original model's, on the sampled rows, with the original's kept rows and after the refit."""

    layer: str
    before: float
    after: float


def _positions(shape: tuple[int, ...], layer) -> tuple[int, ...]:
    """The output positions a reader computes from an input of ``shape``: (samples, height, width) for a
    Conv2D, (samples,) for a Dense layer (every leading axis together)."""
    if type(layer).__name__ != "Conv2D":
        return (int(np.prod(shape[:-1])),)
    sizes = []
    for size, kernel, stride, rate in zip(shape[1:3], layer.kernel_size, layer.strides, layer.dilation_rate, strict=True):
        span = rate * (kernel - 1) + 1
        sizes.append(-(-size // stride) if layer.padding == "same" else (size - span) // stride + 1)
    return (shape[0], *sizes)


def _linear_rows(values: np.ndarray, layer, pick: np.ndarray) -> np.ndarray:
    """The rows a reader's kernel multiplies at the output positions ``pick`` (flat indices into
    :func:`_positions`): the patch for a Conv2D, in its kernel's (height, width, channel) order, gathered
    at those positions only (the patches of a whole batch at 224 px would not fit in memory); the input
    itself for a Dense layer."""
    if type(layer).__name__ != "Conv2D":
        return values.reshape(-1, values.shape[-1])[pick]
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.strides, layer.dilation_rate
    n, i, j = np.unravel_index(pick, _positions(values.shape, layer))
    if layer.padding == "same":  # TensorFlow's: the extra row or column of an odd padding goes after
        pads = [max((out - 1) * stride + rate * (kernel - 1) + 1 - size, 0) for out, stride, rate, kernel, size in
                zip(_positions(values.shape, layer)[1:], (sh, sw), (dh, dw), (kh, kw), values.shape[1:3], strict=True)]
        values = np.pad(values, ((0, 0), (pads[0] // 2, pads[0] - pads[0] // 2), (pads[1] // 2, pads[1] - pads[1] // 2),
                                 (0, 0)))
    rows = (i * sh)[:, None, None] + (dh * np.arange(kh))[None, :, None]
    cols = (j * sw)[:, None, None] + (dw * np.arange(kw))[None, None, :]
    return values[n[:, None, None], rows, cols].reshape(len(pick), -1)


def reconstruct(original, shrunk, the_plan: Plan, images: np.ndarray, *, batch_size: int = 16,
                samples: int = RECONSTRUCT_SAMPLES, ridge: float = RECONSTRUCT_RIDGE, seed: int = 0,
                progress=lambda _: None) -> list[Refit]:
    """Refits every layer of ``shrunk`` that lost input channels so that it computes, from the channels it
    still reads, what the original layer computed from all of them; returns one :class:`Refit` per layer.

    Zeroing a removed channel drops both what it carries and its mean: in a pretrained MobileNetV2 a tenth of
    every group removed that way leaves chance, although the kept channels still hold most of the signal
    (channel pruning's reconstruction step, He et al. 2017, and ThiNet). Layer by layer in graph order, on
    ``images`` (training images), the shrunk model's input to the layer (with the layers before it already
    refit) and the original model's output before its activation give a ridge least-squares problem whose
    solution, pulled toward the original kernel's kept rows, becomes the layer's kernel; the intercept goes
    to the layer's bias, or, for a layer without one that feeds only a BatchNormalization, into that
    layer's moving mean. Conv2D (any kernel size, stride and dilation, as patches) and Dense are refit; one
    reading more than RECONSTRUCT_MAX_INPUTS inputs per output is left as it is, with a progress line.
    """
    k = models.keras()
    g = graph(original)
    a = _analyse(g, None)
    kept = {a.spaces.find(a.producers[grp.producers[0]]): grp.keep for grp in the_plan.groups if grp.keep is not None}
    todo = [n for n in a.order if n in a.readers and len(_rows(a.readers[n], kept, a.spaces)) < a.readers[n].width]
    if not todo:
        return []
    flat = masked(original, Plan([], {}, {}))
    after_layer = _consumers(g.config)
    rng = np.random.default_rng(seed)
    x = np.asarray(images, np.float32)
    batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    refits = []
    every = -(-len(todo) // 5)  # about five progress lines, whatever the depth
    for number, name in enumerate(todo, 1):
        if number % every == 1 or every == 1:
            progress(f"refitting `{name}` on {len(x)} training images ({number}/{len(todo)} layers that lost inputs)")
        layer, full = shrunk.get_layer(name), flat.get_layer(name)
        rows = _rows(a.readers[name], kept, a.spaces)
        kernel = full.kernel.numpy()
        if int(np.prod(kernel.shape[:-2])) * len(rows) > RECONSTRUCT_MAX_INPUTS:
            progress(f"`{name}` reads {int(np.prod(kernel.shape[:-2])) * len(rows):,} inputs per output, more than "
                     f"{RECONSTRUCT_MAX_INPUTS:,}: not refit (its kept rows stay as they are)")
            continue
        outputs = kernel.shape[-1]
        cols = kept.get(a.spaces.find(a.producers[name]), np.arange(outputs))
        bias = full.bias.numpy() if full.use_bias else np.zeros(outputs, np.float32)
        # The original kernel as the full input rows multiply it, then restricted to the kept rows.
        w_full = kernel.reshape(-1, kernel.shape[-2], outputs)[:, :, cols]
        prior = w_full[:, rows, :].reshape(-1, len(cols))
        w_full = w_full.reshape(-1, len(cols))
        follows = after_layer.get(name, [])
        into_bn = (not full.use_bias and len(follows) == 1
                   and type(g.layers[follows[0]]).__name__ == "BatchNormalization")
        intercept = full.use_bias or into_bn
        probes = [k.Model(m.inputs, m.get_layer(name).input) for m in (shrunk, flat)]
        width = prior.shape[0] + intercept
        gram, cross = np.zeros((width, width)), np.zeros((width, len(cols)))
        target_sum, target_square, count = np.zeros(len(cols)), np.zeros(len(cols)), 0
        per_batch = -(-samples // len(batches))
        for batch in batches:
            kept_in, full_in = (p(batch, training=False).numpy() for p in probes)
            positions = int(np.prod(_positions(kept_in.shape, layer)))
            pick = np.sort(rng.choice(positions, min(per_batch, positions), replace=False))
            xs = _linear_rows(kept_in, layer, pick).astype(np.float64)
            ys = _linear_rows(full_in, layer, pick).astype(np.float64) @ w_full + bias[cols]
            if intercept:
                xs = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
            gram += xs.T @ xs
            cross += xs.T @ ys
            target_sum += ys.sum(axis=0)
            target_square += (ys**2).sum(axis=0)
            count += len(xs)
        start = np.concatenate([prior, bias[cols][None]]) if intercept else prior
        penalty = np.eye(width) * ridge * np.trace(gram[:prior.shape[0], :prior.shape[0]]) / max(prior.shape[0], 1)
        if intercept:
            penalty[-1, -1] = 0.0
        solution = np.linalg.solve(gram + penalty, cross + penalty @ start)
        spread = float(np.sum(target_square - target_sum**2 / count)) or 1.0

        def error(w, gram=gram, cross=cross, target_square=target_square, spread=spread):
            return float(max(np.sum(w * (gram @ w)) - 2 * np.sum(w * cross) + np.sum(target_square), 0.0) / spread)

        refits.append(Refit(name, error(start), error(solution)))
        weights = layer.get_weights()
        weights[0] = solution[:prior.shape[0]].reshape(weights[0].shape).astype(np.float32)
        if full.use_bias:
            weights[1] = solution[-1].astype(np.float32)
        layer.set_weights(weights)
        if into_bn:
            norm = shrunk.get_layer(follows[0])
            norm.moving_mean.assign(norm.moving_mean.numpy() - solution[-1].astype(np.float32))
    return refits


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """How much removing each share of one group's channels, the rest of the model whole, changes its outputs:
    per group (named by its first producer), the mean KL divergence of the model's output probabilities from
    the original's at each of ``levels``; and each group's width."""

    levels: tuple[float, ...]
    change: dict[str, tuple[float, ...]]
    widths: dict[str, int]


def sensitivity(model, images: np.ndarray, layer_types: list[str] | None = None,
                levels: tuple[float, ...] = SENSITIVITY_LEVELS, progress=lambda _: None) -> Sensitivity:
    """Measures :class:`Sensitivity` on ``images`` (training images: the budget is judged on validation ones).

    Groups do not matter alike: in a pretrained MobileNetV2, removing a tenth of one early block's expanded
    channels (lowest BN scale first, as the plan removes them) halves validation accuracy, while a tenth of
    most later blocks changes no prediction; a tenth of every group at once leaves chance. Each group is
    measured alone, by zeroing its removed channels' rows in its readers (:func:`masked`), one share at a
    time, on one flat copy of the model whose rows are put back after each measurement.
    """
    g = graph(model)
    a = _analyse(g, layer_types)
    flat = masked(model, Plan([], {}, {}))
    x = np.asarray(images, np.float32)

    def probabilities():
        return np.clip(flat.predict(x, batch_size=32, verbose=0).astype(np.float64), 1e-7, 1.0)

    reference = probabilities()
    plans = [_plan(g, a, level) for level in levels]
    prunable = [grp for grp in plans[0].groups if grp.keep is not None]
    change: dict[str, list[float]] = {grp.producers[0]: [] for grp in prunable}
    for n, (level, the_plan) in enumerate(zip(levels, plans, strict=True)):
        progress(f"sensitivity: {level:.0%} of each of {len(prunable)} groups alone ({n + 1}/{len(levels)})")
        for grp in the_plan.groups:
            if grp.keep is None:
                continue
            root = a.spaces.find(a.producers[grp.producers[0]])
            saved = {}
            for name, layout in a.readers.items():
                rows = _rows(layout, {root: grp.keep}, a.spaces)
                if len(rows) < layout.width:
                    kernel, *rest = saved[name] = flat.get_layer(name).get_weights()
                    kernel = kernel.copy()
                    kernel[..., np.setdiff1d(np.arange(layout.width), rows), :] = 0
                    flat.get_layer(name).set_weights([kernel, *rest])
            if not saved:  # a narrow group loses no channel at a small share: nothing to measure
                change[grp.producers[0]].append(0.0)
                continue
            out = probabilities()
            change[grp.producers[0]].append(float(np.mean(np.sum(reference * np.log(reference / out), axis=-1))))
            for name, weights in saved.items():
                flat.get_layer(name).set_weights(weights)
    return Sensitivity(tuple(levels), {k: tuple(v) for k, v in change.items()},
                       {grp.producers[0]: grp.width for grp in prunable})


def allocate(measured: Sensitivity, fraction: float) -> dict[str, float]:
    """Per group, the share of its channels to remove so that ``fraction`` of all prunable channels go,
    taken where they change the outputs least: one threshold on the measured change, each group removing the
    largest measured share whose change is under it (a group's changes are made non-decreasing first). A
    ``fraction`` above what every group's largest share gives is capped there."""
    if fraction <= 0:
        return {name: 0.0 for name in measured.change}
    levels = (0.0, *measured.levels)
    steps = {name: np.maximum.accumulate(np.asarray((0.0, *values))) for name, values in measured.change.items()}
    total = sum(measured.widths.values())

    def shares(threshold: float) -> dict[str, float]:
        return {name: levels[int(np.searchsorted(c, threshold, side="right")) - 1] for name, c in steps.items()}

    def removed(chosen: dict[str, float]) -> float:
        return sum(measured.widths[name] * share for name, share in chosen.items())

    for threshold in sorted({float(v) for c in steps.values() for v in c}):
        chosen = shares(threshold)
        if removed(chosen) >= fraction * total - 1e-9:
            return chosen
    return shares(float("inf"))


def _rebuilt(model, g: Graph):
    """A new model from the flat graph ``g`` of ``model``, with its layers' weights and trainable flags."""
    k = models.keras()
    custom = {type(layer).__name__: type(layer) for layer in g.layers.values() if layer is not None}
    with k.utils.custom_object_scope(custom):
        rebuilt = k.Model.from_config(copy.deepcopy(g.config)) if not g.sequential else k.models.clone_model(model)
    for layer in rebuilt.layers:
        if (source := g.layers.get(layer.name)) is not None:
            if source.weights:
                layer.set_weights(source.get_weights())
            layer.trainable = source.trainable
    return rebuilt


def flat(model):
    """``model`` with its nested functional bases inlined: the same layers, weights, trainable flags and outputs.

    tfmot wraps only a model's own layers, and a keras.applications base is one
    layer of the classifier around it; inlined, its convolutions can be pruned.
    Each inner layer keeps the ``training`` its base was called with.
    """
    return _rebuilt(model, graph(model))


def masked(model, the_plan: Plan):
    """The original model, flat, with every removed channel's input rows zeroed in the layers that read it.

    It computes what the shrunk model computes: every kept channel is computed by
    channel-wise operations from kept channels only, and a removed channel
    reaches nothing but its readers' zeroed rows. The contract the tests hold
    :func:`shrink` to.
    """
    g = graph(model)
    a = _analyse(g, None)
    full = {}
    for grp in the_plan.groups:
        if grp.keep is not None:
            full[a.spaces.find(a.producers[grp.producers[0]])] = grp
    flat = _rebuilt(model, g)
    kept = {root: grp.keep for root, grp in full.items()}
    for name, layout in a.readers.items():
        rows = _rows(layout, kept, a.spaces)
        width = layout.width
        if len(rows) == width:
            continue
        kernel, *rest = flat.get_layer(name).get_weights()
        dropped = np.setdiff1d(np.arange(width), rows)
        kernel[..., dropped, :] = 0
        flat.get_layer(name).set_weights([kernel, *rest])
    return flat
