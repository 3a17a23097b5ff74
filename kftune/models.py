"""Model families kftune builds, and how models are saved and loaded between steps.

Every model takes raw uint8-range images (0..255) and does its own input
scaling inside the graph, so a user never has to remember which backbone wants
which preprocessing, and an exported model is served with the same inputs it
was trained on.

Models travel between pipeline steps as a folder holding ``model.keras`` (the
Keras v3 file format of tf-keras, loaded in safe mode so that an artifact cannot
smuggle in code through Lambda layers) and ``model.json`` (what built it).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import kftune  # noqa: F401 - selects tf-keras before TensorFlow is imported
from kftune import keras_compat
from kftune.errors import InputError

MODEL_FILE = "model.keras"
META_FILE = "model.json"


def keras():
    """tf-keras, the Keras 2 API that tensorflow-model-optimization can prune.

    Imported on first use, so that reading configs (as the pipeline compiler
    does) does not load TensorFlow. kftune's own layers are registered with it.
    """
    import tf_keras

    from kftune import layers  # noqa: F401 - registers kftune's layers for safe-mode loading

    return tf_keras


def output_head(num_classes: int) -> tuple[int, str, str]:
    """(units, activation, loss) for the output layer.

    Two classes get one sigmoid unit and binary cross-entropy, as in the classic
    Keras examples; more get a softmax and sparse categorical cross-entropy.
    """
    if num_classes < 2:
        raise InputError(f"a classifier needs at least 2 classes. Received: num_classes={num_classes}")
    if num_classes == 2:
        return 1, "sigmoid", "binary_crossentropy"
    return num_classes, "softmax", "sparse_categorical_crossentropy"


def predict_classes(probabilities):
    """Class ids from model outputs, for both head shapes."""
    import numpy as np

    probabilities = np.asarray(probabilities)
    if probabilities.shape[-1] == 1:
        return (probabilities[:, 0] >= 0.5).astype(np.int64)
    return probabilities.argmax(axis=-1)


def class_probabilities(outputs):
    """(N, num_classes) probabilities from model outputs, for both head shapes."""
    import numpy as np

    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.shape[-1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=-1)
    return outputs


def small_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    filters: int = 32,
    num_layers: int = 2,
    dense_units: int = 64,
    dropout: float = 0.2,
    **_,
):
    """A small convolutional network: conv blocks, then a dense classifier head.

    Extra hyperparameters (learning rate, batch size, ...) are accepted and
    ignored, so a search space may hold training knobs too.
    """
    k = keras()
    layers = k.layers
    inputs = k.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    for i in range(int(num_layers)):
        x = layers.Conv2D(int(filters) * 2**i, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        if x.shape[1] >= 4:
            x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(int(dense_units), activation="relu", name="dense")(x)
    x = layers.Dropout(float(dropout))(x)
    units, activation, _ = output_head(num_classes)
    # float32 outputs keep the loss stable under mixed precision.
    outputs = layers.Dense(units, activation=activation, dtype="float32", name="predictions")(x)
    return k.Model(inputs, outputs, name="small_cnn")


FAMILIES: dict[str, Callable] = {"small_cnn": small_cnn}


def resolve_builder(name: str) -> Callable:
    """A model-building function: a built-in family or the user's ``module:function``.

    The function is called as ``fn(input_shape, num_classes, **hyperparameters)``
    and returns an uncompiled tf-keras model.
    """
    if name in FAMILIES:
        return FAMILIES[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(
            f"model `{name}` is neither a built-in family ({', '.join(FAMILIES)}) nor `module:function`."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(
            f"model `{name}`: module `{module_name}` cannot be imported ({e}). Install it in the "
            "component image (see README, 'Your own model')."
        ) from e
    if not callable(getattr(module, attr, None)):
        raise InputError(f"model `{name}`: `{module_name}` has no function `{attr}`.")
    return getattr(module, attr)


class BuilderError(RuntimeError):
    """The model-building function raised: a failed trial, or (on the search's first call) a function that is no builder."""


def build(name: str, input_shape, num_classes: int, **hyperparameters):
    """Builds a model with the family or the user's ``module:function`` ``name``, and checks what came back.

    A function that raises is a failed trial (it may fail for some
    hyperparameters only), named in the trial's error. One that returns
    something other than a tf-keras model whose output fits the classes is a
    mistake in the function: one line, naming it, before any training.
    """
    builder = resolve_builder(name)
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # a builtin without one: the call itself tells
        signature = None
    if signature is not None:
        try:
            signature.bind(tuple(input_shape), num_classes, **hyperparameters)
        except TypeError as e:
            # Not a failed trial: every trial would fail the same way before the function's body ran.
            raise InputError(
                f"model function `{name}` cannot be called as fn(input_shape, num_classes"
                f"{''.join(f', {k}=...' for k in hyperparameters)}): {e}. A model builder takes the input shape, "
                "the number of classes and the search space's hyperparameters as keywords.") from e
    try:
        model = builder(tuple(input_shape), num_classes, **hyperparameters)
    except Exception as e:  # noqa: BLE001 - the user's own code: named, then recorded as the trial's failure
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise BuilderError(f"model function `{name}` raised {type(e).__name__}: {first}") from e
    k = keras()
    if not isinstance(model, k.Model):
        kind = type(model).__module__.split(".")[0] if model is not None else ""
        hint = ("it is a Keras 3 model: build it with tf-keras (import tf_keras as keras), which kftune and "
                "tensorflow-model-optimization use" if kind == "keras" else
                "it must return an uncompiled tf-keras model (tf_keras.Model)")
        raise InputError(f"model function `{name}` returned {type(model).__name__} ({type(model).__module__}): {hint}.")
    units, activation, _ = output_head(num_classes)
    shape = tuple(model.output_shape) if not isinstance(model.output_shape, list) else None
    if shape is None or shape[-1] != units:
        raise InputError(
            f"model function `{name}` returns outputs of shape {model.output_shape} for {num_classes} classes: "
            f"its model must end in one output layer of {units} unit(s) ({activation}).")
    return model


OPTIMIZERS = ("adam", "sgd", "rmsprop", "adamw")


def compile_model(model, num_classes: int, *, optimizer: str = "adam", learning_rate: float = 1e-3, momentum: float = 0.0):
    """Compiles with the loss that fits the output head, tracking accuracy."""
    k = keras()
    name = str(optimizer).lower()
    if name not in OPTIMIZERS:
        raise InputError(f"`optimizer` must be one of {OPTIMIZERS}. Received: optimizer={optimizer}")
    lr = float(learning_rate)
    opt = {
        "adam": lambda: k.optimizers.Adam(lr),
        "sgd": lambda: k.optimizers.SGD(lr, momentum=float(momentum)),
        "rmsprop": lambda: k.optimizers.RMSprop(lr),
        "adamw": lambda: k.optimizers.AdamW(lr),
    }[name]()
    _, _, loss = output_head(num_classes)
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    return model


@dataclasses.dataclass
class ModelMeta:
    """What ``model.json`` records beside a saved model."""

    family: str
    class_names: list[str]
    input_shape: list[int]
    hyperparameters: dict = dataclasses.field(default_factory=dict)
    stage: str = ""


def _without_optimizer(model):
    """The model's architecture and weights without its optimizer's slots (Adam's would triple the file)."""
    if model.optimizer is None:
        return model
    bare = keras().models.clone_model(model)
    bare.set_weights(model.get_weights())
    return bare


def save_weights(model, path: str | Path) -> None:
    """Saves the model's own weights only: what a later step loads, a third of the size with Adam's slots."""
    _without_optimizer(model).save_weights(path)


def save(model, folder: str | Path, meta: ModelMeta) -> Path:
    """Saves ``model`` and its metadata into ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Optimizer slots would double or triple the file and skew every size
    # comparison; each step compiles the model it trains itself.
    _without_optimizer(model).save(folder / MODEL_FILE)
    (folder / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=2))
    return folder


# Modules a kftune model's config may name: Keras' own, and kftune's registered layers.
TRUSTED_MODULES = ("keras", "tf_keras", "kftune.layers")
TRUSTED_ENV = "KFTUNE_TRUSTED_MODULES"


def export_saved_model(model, path: str | Path) -> None:
    """Writes ``model`` as a SavedModel with a ``serve`` endpoint (``model.export``), printing nothing.

    tf-keras prints every endpoint's signature, with one line per captured
    variable, on stdout after writing; in a step's log that is dozens of lines
    nobody reads (``saved_model_cli show --dir PATH --all`` shows the same).
    """
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        model.export(str(path))


def _trusted(module: str) -> bool:
    import os

    extra = tuple(m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip())
    return any(module == m or module.startswith(f"{m}.") for m in (*TRUSTED_MODULES, *extra))


def inspect_archive(path: str | Path) -> None:
    """Refuses a ``.keras`` file whose config names a module outside the trusted ones, before Keras reads it.

    tf-keras' safe mode imports a module named in the config before it refuses
    the class (the class of CVE-2025-1550), so an artifact could run code on
    import alone. kftune reads the config itself first and never lets Keras see
    such a file. Your own layers' package can be trusted with
    ``KFTUNE_TRUSTED_MODULES=my_package`` in the component's environment.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise InputError(f"`{path}` is not a loadable Keras model ({type(e).__name__}: not a .keras archive): pass "
                         "the Model folder a kftune step wrote.") from e
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module = node.get("module")
            if isinstance(module, str) and module and not _trusted(module):
                raise InputError(
                    f"`{path}` is not a loadable Keras model: its config names module `{module}` (class "
                    f"`{node.get('class_name')}`), and Keras would import it and run its code. Lambda layers and "
                    f"custom code are refused: pass a model a kftune step wrote, or trust your own layers' package "
                    f"with {TRUSTED_ENV}={module.split('.')[0]}.")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def content_fingerprint(folder: str | Path) -> str:
    """A hash of the model saved in ``folder``: its architecture and weights, not when it was saved.

    A ``.keras`` file is a zip whose metadata.json holds the save date (and whose
    entries carry it), so the same model saved twice gives two file MD5s. This
    hashes the zip's config.json and model.weights.h5 contents instead: what
    checkpoints are tied to, so that a rerun that saves the same model again
    finds them.
    """
    import hashlib
    import zipfile

    path = Path(folder, MODEL_FILE)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as archive:
            for name in sorted(n for n in archive.namelist() if n != "metadata.json"):
                digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    except zipfile.BadZipFile:
        digest.update(path.read_bytes())  # not a .keras zip: the bytes are all there is
    return digest.hexdigest()


def load(folder: str | Path):
    """Loads a model saved by :func:`save` (uncompiled), in Keras safe mode. Returns (model, meta)."""
    folder = Path(folder)
    path = folder / MODEL_FILE
    if not path.exists():
        raise InputError(f"`{folder}` holds no {MODEL_FILE}: pass a model written by a kftune step.")
    inspect_archive(path)
    try:
        model = keras().models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - a broken file must not surface as a deep traceback
        reason = str(e).splitlines()[0][:200] if str(e) else ""
        raise InputError(
            f"`{path}` is not a loadable Keras model ({type(e).__name__}: {reason}): pass the Model folder a kftune "
            "step wrote (tf-keras model.keras; Lambda layers and custom code are refused)."
        ) from e
    meta_file = folder / META_FILE
    try:
        meta = ModelMeta(**json.loads(meta_file.read_text())) if meta_file.exists() else None
    except (ValueError, TypeError) as e:
        raise InputError(f"`{meta_file}` is not the model.json a kftune step writes ({e}): remove or fix it.") from e
    return model, meta


def check_fits(model, meta: ModelMeta | None, info, where: str | Path) -> None:
    """Refuses a model built for other classes or another image shape than the dataset ``info`` describes.

    Checked before any training or measuring, so the mistake costs seconds and
    says which model and dataset disagree, instead of failing deep inside
    TensorFlow, or, worse, training a head of the wrong width without a word.
    """
    if meta is not None and list(meta.class_names) != list(info.class_names):
        raise InputError(
            f"model `{where}` was trained on classes {meta.class_names} but the dataset has {info.class_names}: "
            "use the model trained on this dataset, or ingest the dataset it was trained on."
        )
    units, _, _ = output_head(info.num_classes)
    if model.output_shape[-1] != units:
        raise InputError(
            f"model `{where}` gives {model.output_shape[-1]} output(s) per image but the dataset's "
            f"{info.num_classes} classes need {units}: use the model trained on this dataset."
        )
    if tuple(model.input_shape[1:]) != tuple(info.shape):
        raise InputError(
            f"model `{where}` takes images of shape {tuple(model.input_shape[1:])} but the dataset holds "
            f"{tuple(info.shape)}: ingest with the model's image_size and channels, or use a model built for them."
        )


# ---------------------------------------------------------------- backbones


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A keras.applications backbone and the input scaling its ImageNet weights expect."""

    constructor: str
    preprocessing: str  # caffe: BGR minus mean; tf: [-1, 1]; none: the model scales itself
    min_size: int = 32
    alpha: float | None = None  # MobileNet's width multiplier


BACKBONES: dict[str, Backbone] = {
    "vgg16": Backbone("VGG16", "caffe"),
    "mobilenet_v2": Backbone("MobileNetV2", "tf"),
    # A third of the width (about 0.4M parameters), with its own ImageNet weights: for CPU-sized work.
    "mobilenet_v2_035": Backbone("MobileNetV2", "tf", alpha=0.35),
    "efficientnet_b0": Backbone("EfficientNetB0", "none"),
    "resnet50": Backbone("ResNet50", "caffe"),
}


def _preprocess_layer(kind: str):
    k = keras()
    if kind == "caffe":
        from kftune.layers import CaffePreprocess

        return CaffePreprocess(name="preprocess")
    if kind == "tf":
        return k.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")
    return None


def backbone_classifier(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str | None = None,
    input_size: int = 0,
    dense_units: int = 256,
    dropout: float = 0.2,
):
    """A keras.applications backbone with a new classifier head. Returns (model, base).

    The model takes raw 0..255 images of ``input_shape``: grayscale is repeated
    to three channels, images are resized to ``input_size`` (at least the
    backbone's minimum), and the backbone's own preprocessing is applied, all
    inside the graph. The base is called with ``training=False`` so that its
    BatchNormalization layers stay in inference mode when it is unfrozen.

    Args:
        weights: None (random), ``imagenet``, or a local ``.h5``/``.weights.h5``
            file holding the base's weights (include_top=False).
    """
    if name not in BACKBONES:
        raise InputError(f"`backbone` must be one of {sorted(BACKBONES)}. Received: backbone={name!r}")
    k = keras()
    spec = BACKBONES[name]
    size = max(int(input_size) or input_shape[0], spec.min_size)
    inputs = k.Input(shape=input_shape, name="image")
    x = inputs
    if input_shape[-1] == 1:
        x = k.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    if (size, size) != tuple(input_shape[:2]):
        x = k.layers.Resizing(size, size, name="resize")(x)
    layer = _preprocess_layer(spec.preprocessing)
    if layer is not None:
        x = layer(x)
    constructor = getattr(k.applications, spec.constructor)
    arguments = {"include_top": False, "input_shape": (size, size, 3), **({"alpha": spec.alpha} if spec.alpha else {})}
    if weights in (None, "imagenet"):
        base = constructor(weights=weights, **arguments)
    else:
        # A weights file holds pretrained (ImageNet) weights: it is loaded into the network Keras builds for
        # ImageNet, which for EfficientNet has one more stem operation than the weights=None one.
        try:
            base = keras_compat.imagenet_network_with_weights(constructor, weights, **arguments)
        except Exception as e:  # noqa: BLE001 - the file is the user's input
            raise InputError(
                f"weights file `{weights}` does not fit {spec.constructor}(include_top=False): "
                f"{str(e).splitlines()[0][:200]}. Save them with base.save_weights() from the model "
                f"keras.applications.{spec.constructor}(include_top=False, weights='imagenet') builds."
            ) from e
    base.trainable = False
    x = base(x, training=False)
    x = k.layers.GlobalAveragePooling2D(name="pool")(x)
    x = k.layers.Dense(int(dense_units), activation="relu", name="dense")(x)
    x = k.layers.Dropout(float(dropout))(x)
    units, activation, _ = output_head(num_classes)
    outputs = k.layers.Dense(units, activation=activation, dtype="float32", name="predictions")(x)
    return k.Model(inputs, outputs, name=f"{name}_classifier"), base
