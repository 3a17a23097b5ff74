"""A search space: hyperparameters declared in YAML, validated, and read by every oracle adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import yaml

from kftune.errors import InputError

PARAM_TYPES = ("float", "int", "choice", "bool", "fixed")
SAMPLINGS = ("linear", "log", "reverse_log")

# The tutorial's grid (learning rate x batch size), kftune's default space. One
# line: KFP writes parameter defaults into a YAML comment that breaks on newlines.
CLASSIC_SPACE_YAML = (
    "{learning_rate: {type: choice, values: [0.001, 0.003, 0.01]}, batch_size: {type: choice, values: [16, 32, 64]}}"
)

_KEYS = {
    "float": {"type", "min", "max", "step", "sampling", "default", "when"},
    "int": {"type", "min", "max", "step", "sampling", "default", "when"},
    "choice": {"type", "values", "default", "when"},
    "bool": {"type", "default", "when"},
    "fixed": {"type", "value", "when"},
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One hyperparameter of a search space."""

    name: str
    type: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    sampling: str = "linear"
    values: tuple = ()
    value: object = None
    default: object = None
    when: tuple[str, tuple] | None = None


def _param(name: str, spec) -> Param:
    where = f"search space `{name}`"
    if not isinstance(spec, dict):
        raise InputError(f"{where} must be a mapping such as {{type: float, min: 0.0001, max: 0.1}}. Received: {spec!r}")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise InputError(f"{where}: `type` must be one of {PARAM_TYPES}. Received: type={kind!r}")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown} for type {kind}; allowed: {sorted(_KEYS[kind])}.")
    when = spec.get("when")
    if when is not None:
        if not isinstance(when, dict) or len(when) != 1:
            raise InputError(f"{where}: `when` must name one parent, e.g. when: {{optimizer: [sgd]}}. Received: {when!r}")
        ((parent, parent_values),) = when.items()
        parent_values = parent_values if isinstance(parent_values, list) else [parent_values]
        when = (parent, tuple(parent_values))
    if kind in ("float", "int"):
        for key in ("min", "max"):
            if not isinstance(spec.get(key), int | float) or isinstance(spec.get(key), bool):
                raise InputError(f"{where}: `{key}` must be a number. Received: {key}={spec.get(key)!r}")
        lo, hi = spec["min"], spec["max"]
        if kind == "int" and (int(lo) != lo or int(hi) != hi):
            raise InputError(f"{where}: an int parameter needs whole-number min and max. Received: min={lo}, max={hi}")
        if lo >= hi:
            raise InputError(f"{where}: `min` must be less than `max`. Received: min={lo}, max={hi}")
        sampling = spec.get("sampling", "linear")
        if sampling not in SAMPLINGS:
            raise InputError(f"{where}: `sampling` must be one of {SAMPLINGS}. Received: sampling={sampling!r}")
        if sampling != "linear" and lo <= 0:
            raise InputError(f"{where}: log sampling needs min > 0. Received: min={lo}")
        step = spec.get("step")
        if step is not None and (not isinstance(step, int | float) or step <= 0):
            raise InputError(f"{where}: `step` must be a positive number. Received: step={step!r}")
        return Param(name, kind, min=lo, max=hi, step=step, sampling=sampling, default=spec.get("default"), when=when)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise InputError(f"{where}: `values` must be a non-empty list. Received: values={values!r}")
        if len({type(v) for v in values} - {int, float}) > 0 and len({type(v) for v in values}) > 1:
            raise InputError(f"{where}: `values` must all be of one type. Received: values={values!r}")
        if len(set(values)) != len(values):
            raise InputError(f"{where}: `values` has duplicates. Received: values={values!r}")
        return Param(name, kind, values=tuple(values), default=spec.get("default"), when=when)
    if kind == "fixed":
        if "value" not in spec:
            raise InputError(f"{where}: a fixed parameter needs `value`.")
        return Param(name, kind, value=spec["value"], when=when)
    return Param(name, kind, default=spec.get("default"), when=when)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A validated search space, declared in YAML as ``name: {type: ..., ...}``.

    Conditional parameters name their parent with ``when``::

        optimizer: {type: choice, values: [adam, sgd]}
        momentum: {type: float, min: 0.0, max: 0.9, when: {optimizer: [sgd]}}
    """

    params: tuple[Param, ...]

    @classmethod
    def from_yaml(cls, text: str) -> SearchSpace:
        try:
            values = yaml.safe_load(text) if text and text.strip() else None
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise InputError(
                f"search space is not valid YAML ({where}{problem}): write a mapping such as "
                "{learning_rate: {type: float, min: 0.0001, max: 0.01, sampling: log}}."
            ) from e
        if not isinstance(values, dict) or not values:
            raise InputError("search space must be a non-empty YAML mapping of name: {type: ..., ...}.")
        params = tuple(_param(str(name), spec) for name, spec in values.items())
        seen: dict[str, Param] = {}
        for p in params:
            if p.when is not None:
                parent, parent_values = p.when
                if parent not in seen:
                    raise InputError(
                        f"search space `{p.name}`: `when` names `{parent}`, which must be declared above it."
                    )
                if seen[parent].type == "choice":
                    missing = [v for v in parent_values if v not in seen[parent].values]
                    if missing:
                        raise InputError(f"search space `{p.name}`: `when` values {missing} are not choices of `{parent}`.")
            seen[p.name] = p
        return cls(params)

    def hyperparameters(self):
        """The space as keras-tuner ``HyperParameters``."""
        import keras_tuner as kt

        hp = kt.HyperParameters()
        for p in self.params:
            scope = hp.conditional_scope(p.when[0], list(p.when[1])) if p.when else contextlib.nullcontext()
            with scope:
                if p.type == "float":
                    hp.Float(p.name, p.min, p.max, step=p.step, sampling=p.sampling, default=p.default)
                elif p.type == "int":
                    hp.Int(p.name, int(p.min), int(p.max), step=int(p.step or 1), sampling=p.sampling, default=p.default)
                elif p.type == "choice":
                    hp.Choice(p.name, list(p.values), default=p.default)
                elif p.type == "bool":
                    hp.Boolean(p.name, default=bool(p.default))
                else:
                    hp.Fixed(p.name, p.value)
        return hp

    def corner(self, last: bool = False) -> dict:
        """A point of the space: each active parameter's default (else its first value or ``min``, False for a
        bool), or with ``last`` its last value or ``max`` (True for a bool)."""
        out: dict = {}
        for p in self.params:
            if p.when and out.get(p.when[0]) not in p.when[1]:
                continue
            if p.type == "fixed":
                out[p.name] = p.value
            elif p.default is not None and not last:
                out[p.name] = p.default
            elif p.type == "choice":
                out[p.name] = p.values[-1 if last else 0]
            elif p.type == "bool":
                out[p.name] = last
            else:
                bound = p.max if last else p.min
                out[p.name] = int(bound) if p.type == "int" else bound
        return out

    def grid_size(self) -> int:
        size = 1
        for p in self.params:
            if p.type == "choice":
                size *= len(p.values)
            elif p.type == "bool":
                size *= 2
            elif p.type == "int" or (p.type == "float" and p.step):
                size *= int(math.floor((p.max - p.min) / (p.step or 1))) + 1
        return size


