"""The pipeline's parameters, declared once.

Each pipeline parameter is a field of one of the steps' config dataclasses
(``IngestConfig``, ``AugmentConfig``, ``SearchConfig``, ``FinetuneConfig``,
``PruneConfig``, ``GateConfig``, ``ExportConfig``, ``DeployConfig``), under the same name: the
field's type and default are the parameter's, and the line its class's
docstring gives it under ``Attributes:`` is the parameter's description. A
field that several steps share (``seed``) is one parameter feeding all of them.

From this one table kftune derives the pipeline's signature and the run form's
descriptions (``pipelines/tuning_pipeline.py``), the check the validation step,
``kftune run-local`` and ``kftune submit`` make (:func:`validate`), the settings
each step receives (:class:`Settings`), and ``kftune run-local --help``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any

from kftune import dataset, storage
from kftune.augment import AugmentConfig
from kftune.dataset import IngestConfig
from kftune.deploy import DeployConfig
from kftune.errors import InputError
from kftune.evaluate import GateConfig
from kftune.export import ExportConfig
from kftune.finetune import FinetuneConfig
from kftune.prune import PruneConfig
from kftune.search import SearchConfig

# Which fields of each step's config the pipeline exposes, in the order the run form lists them.
# The rest (shard sizes, batch-size overrides, Hyperband's factor) keep their defaults.
STAGES: dict[str, tuple[type, tuple[str, ...]]] = {
    "ingest": (IngestConfig, ("source", "image_size", "channels", "validation_fraction", "test_fraction", "seed",
                              "max_corrupt_fraction")),
    "augment": (AugmentConfig, ("augment_spec", "augment_copies")),
    "search": (SearchConfig, ("search_space", "search_algorithm", "max_trials", "early_stopping", "parallel_trials",
                              "trial_epochs", "folds", "model", "search_state_uri")),
    "finetune": (FinetuneConfig, ("backbone", "weights", "finetune_epochs", "unfreeze_epochs", "unfreeze_layers",
                                  "unfreeze_steps", "finetune_learning_rate", "finetune_lr_factor",
                                  "backbone_input_size", "patience", "checkpoint_uri")),
    "prune": (PruneConfig, ("prune_method", "target_sparsity", "prune_schedule", "prune_initial_sparsity", "prune_epochs",
                            "prune_begin_step", "prune_end_step", "prune_frequency", "prune_layer_types",
                            "prune_allocation", "prune_m_by_n", "prune_learning_rate", "prune_quantize", "prune_max_accuracy_drop",
                            "prune_sparsity_levels", "prune_distill_weight", "prune_distill_temperature")),
    "gate": (GateConfig, ("min_accuracy", "max_accuracy_drop", "max_size_bytes")),
    "export": (ExportConfig, ("export_destination", "export_version")),
    "deploy": (DeployConfig, ("serving_name", "serving_namespace", "serving_storage_uri", "canary_traffic_percent",
                              "serving_timeout")),
}
# Fields every step that has them takes from one parameter (ingest refuses too few images for the folds; fine-tune
# and prune keep their checkpoints in folders of their own under checkpoint_uri).
SHARED = ("seed", "folds", "checkpoint_uri")

_TYPES = {int: "int", float: "float", str: "str", bool: "bool"}
_KINDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One pipeline parameter: a config field, described by its class's docstring."""

    name: str
    type: type
    default: Any
    description: str
    stages: tuple[str, ...]

    @property
    def type_name(self) -> str:
        return _TYPES[self.type]


def _attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style class docstring, as {name: one-paragraph text}."""
    doc = cls.__doc__ or ""
    _, _, section = doc.partition("Attributes:")
    out: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if match := re.match(r"^ {8}(\w+): (.*)$", line):
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.startswith(" " * 12) and line.strip():
            out[current] += " " + line.strip()
        elif line.strip() and not line.startswith(" " * 8):
            break
    # Sphinx markup reads badly in the run form: ``x`` -> x.
    return {k: re.sub(r"``([^`]*)``", r"\1", v) for k, v in out.items()}


def _table() -> tuple[Parameter, ...]:
    params: dict[str, Parameter] = {}
    for stage, (cls, names) in STAGES.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        docs = _attribute_docs(cls)
        for name in names:
            field = fields[name]
            kind = hints[name]
            if name in params:
                raise AssertionError(f"pipeline parameter `{name}` is exposed by two configs: list it once in STAGES")
            if name not in docs:
                raise AssertionError(f"{cls.__name__}.{name} has no line under Attributes: in its docstring")
            params[name] = Parameter(name, kind, field.default, docs[name], (stage,))
    for name in SHARED:
        # The stage that exposes it first: the settings table lists it there.
        feeds = params[name].stages + tuple(stage for stage, (cls, _) in STAGES.items()
                                            if stage not in params[name].stages
                                            and name in {f.name for f in dataclasses.fields(cls)})
        params[name] = dataclasses.replace(params[name], stages=feeds)
    return tuple(params.values())


PARAMETERS: tuple[Parameter, ...] = _table()
BY_NAME: dict[str, Parameter] = {p.name: p for p in PARAMETERS}


def defaults() -> dict[str, Any]:
    return {p.name: p.default for p in PARAMETERS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every step's config, built and checked from the pipeline's parameters."""

    ingest: IngestConfig
    augment: AugmentConfig
    search: SearchConfig
    finetune: FinetuneConfig
    prune: PruneConfig
    gate: GateConfig
    export: ExportConfig
    deploy: DeployConfig

    def stage_json(self, stage: str) -> str:
        """One step's config as the JSON string the step receives."""
        return json.dumps(dataclasses.asdict(getattr(self, stage)), sort_keys=True)


def _coerce(param: Parameter, value):
    """Types a value as the parameter declares it; the KFP form and the CLI send text or floats for ints."""
    if param.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if param.type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if param.type is float and isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"`{param.name}` must be a finite number. Received: {param.name}={value!r}")
    if not isinstance(value, param.type) or (param.type is not bool and isinstance(value, bool)):
        raise InputError(f"`{param.name}` must be {_KINDS[param.type]}. Received: {param.name}={value!r}")
    return value


def validate(values: dict[str, Any]) -> Settings:
    """Builds every step's config from pipeline parameters (defaults for those not given).

    Raises InputError naming the first bad parameter, before any work starts.
    """
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise InputError(f"unknown pipeline parameter(s) {', '.join(unknown)}; the parameters are: "
                         f"{', '.join(BY_NAME)}. `kftune params` lists them with their types and defaults.")
    typed = {name: _coerce(BY_NAME[name], value) for name, value in {**defaults(), **values}.items()}
    built = {}
    for stage, (cls, _) in STAGES.items():
        names = {f.name for f in dataclasses.fields(cls)}
        built[stage] = cls(**{p.name: typed[p.name] for p in PARAMETERS if p.name in names and stage in p.stages})
    settings = Settings(**built)
    settings.search.check_workers()
    if settings.deploy.serving_name and settings.export.export_destination:
        # An empty destination is the pipeline root's, known only in the run: check_locations checks it there.
        settings.deploy.storage_base(settings.export.export_destination)
    return settings


def help_table() -> str:
    """Every parameter with its type, default and description, for ``kftune params`` and ``kftune run-local --help``."""
    import textwrap

    lines = []
    for p in PARAMETERS:
        default = json.dumps(p.default) if isinstance(p.default, str) else repr(p.default)
        if len(default) > 60:
            default = default[:57] + "...\""
        lines.append(f"  {p.name} ({p.type_name}, default {default})")
        lines.extend(textwrap.wrap(p.description, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def load(cls: type, text: str):
    """A step's config from the JSON the validation step wrote for it (:meth:`Settings.stage_json`)."""
    return cls(**json.loads(text))


def resolve(settings: Settings, pipeline_root: str, run_id: str) -> Settings:
    """Fills in the locations left empty with their per-run defaults under the pipeline root."""
    root = pipeline_root.rstrip("/")
    if not root:
        raise InputError("the run has no pipeline root: set one in the cluster profile or with "
                         "`kftune submit --pipeline-root gs://BUCKET/kftune`.")
    storage.check_location(root, "pipeline_root")
    search = settings.search
    checkpoints = settings.finetune.checkpoint_uri or f"{root}/kftune-checkpoints/{run_id}"
    return dataclasses.replace(
        settings,
        search=dataclasses.replace(search, search_state_uri=search.search_state_uri or f"{root}/kftune-search/{run_id}"),
        finetune=dataclasses.replace(settings.finetune, checkpoint_uri=checkpoints),
        prune=dataclasses.replace(settings.prune, checkpoint_uri=checkpoints),
        export=dataclasses.replace(settings.export, export_destination=settings.export.destination_for(root)),
    )


def check_locations(settings: Settings) -> list[str]:
    """Checks every location the run will read or write, before any step asks for a GPU.

    Reads must exist (the dataset, a weights file); writes must be reachable (a
    bucket that exists and answers) or creatable (a local folder); an export
    version given up front must not exist yet. Returns one line per location checked.
    """
    from kftune import export

    lines = []
    source = settings.ingest.source
    if source != dataset.BUNDLED:
        if not storage.exists(source):
            raise InputError(f"`source` `{source}` does not exist or holds no files: give a folder, TFRecord "
                             f"shards, a gs:// prefix or {dataset.BUNDLED}.")
        lines.append(f"source: {source} (found)")
    weights = settings.finetune.weights
    if settings.finetune.backbone and weights not in ("imagenet", "none"):
        if not storage.exists(weights):
            raise InputError(f"`weights` `{weights}` does not exist: give a weights file or gs:// URI, imagenet or none.")
        from kftune import finetune

        finetune.check_weights_file(settings.finetune, settings.ingest.image_size)
        lines.append(f"weights: {weights} (found; {settings.finetune.backbone}'s base loads it)")
    for name, uri in (("search_state_uri", settings.search.search_state_uri),
                      ("checkpoint_uri", settings.finetune.checkpoint_uri),
                      ("export_destination", settings.export.export_destination)):
        if not uri:
            continue
        storage.check_writable(uri, name)
        lines.append(f"{name}: {uri} (writable)")
    if settings.deploy.serving_name:
        base = settings.deploy.storage_base(settings.export.export_destination)
        lines.append(f"serving: InferenceService {settings.deploy.serving_name} will read the export from {base}")
    if settings.export.export_version and settings.export.export_destination:
        uri = export.version_uri(settings.export.export_destination, settings.export.export_version)
        if export.version_taken(settings.export.export_destination, settings.export.export_version):
            raise InputError(f"`export_version` `{settings.export.export_version}` already exists at `{uri}` and kftune "
                             "never overwrites an export: choose a new version, or leave it empty for the next free number.")
    return lines


def settings_markdown(settings: Settings, locations: list[str]) -> str:
    """The run's settings, step by step, and the locations checked: the validation step's artifact."""
    from kftune import report

    rows = []
    for stage in STAGES:
        config = getattr(settings, stage)
        for p in PARAMETERS:
            if p.stages[0] == stage:
                value = getattr(config, p.name)
                shown = str(value) if len(str(value)) <= 80 else str(value)[:77] + "..."
                rows.append([stage, p.name, f"`{shown}`", "" if value == p.default else "set"])
    text = "## Run settings\n\n" + report.markdown_table(["step", "parameter", "value", ""], rows)
    if locations:
        text += "\n\n## Locations checked\n\n" + "\n".join(f"- {line}" for line in locations)
    return text + "\n"
