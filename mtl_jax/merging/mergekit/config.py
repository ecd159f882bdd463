"""MergeKit (0.1.5) YAML -> a typed, checked :class:`MergeConfig`.

Accepted top-level keys (:data:`TOP_KEYS`): ``merge_method``, ``base_model``, exactly one of
``models`` / ``slices``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` (only
``null``), ``name``. Everything MergeKit accepts but this path does not implement (``modules``,
``tokenizer``, ``tokenizer_source`` other than null, ``chat_template``, ``residual_weight``) and
every key MergeKit itself would ignore (a typo) is refused with one line naming the key and the
valid ones; MergeKit's pydantic models drop unknown keys silently.

A parameter setting (MergeKit's ``ParameterSetting``) is a scalar, a list of scalars (a
gradient over the layers of a slice), a ``{filter, value}`` mapping, or a list of such mappings
(the first whose ``filter`` is a substring of the tensor name, ``*`` or absent applies).
:func:`evaluate_setting` resolves one for a tensor name and a layer position ``t`` in [0, 1]
exactly as ``mergekit.config.evaluate_setting``: numeric gradients interpolate linearly between
neighbouring entries at ``t * (len - 1)``, booleans / strings pick entry ``int(t * (len - 1))``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

import yaml

from mtl_jax.errors import UsageError

TOP_KEYS = ("base_model", "dtype", "merge_method", "models", "name", "out_dtype", "parameters", "slices", "tokenizer_source")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("base_model", "parameters", "sources")
SOURCE_KEYS = ("layer_range", "model", "parameters")
# Keys MergeKit has that this path refuses (with the reason).
NOT_SUPPORTED = {
    "modules": "multi-module architectures are not supported; use models or slices",
    "tokenizer": "tokenizer merging is not supported; the base model's tokenizer files are copied",
    "chat_template": "chat templates are not supported; the base model's tokenizer files are copied",
    "residual_weight": "residual_weight is not supported",
}
DTYPES = ("bfloat16", "float16", "float32", "float64")

Scalar = Union[bool, int, float, str]


@dataclasses.dataclass(frozen=True)
class Conditional:
    """One ``{filter: substring, value: setting}`` entry (``filter`` None or '*': any tensor)."""

    value: Any
    filter: Optional[str] = None


Setting = Union[Scalar, list, Conditional]


@dataclasses.dataclass(frozen=True)
class SourceSlice:
    """One model's contribution to an output slice: layers ``[start, end)`` of ``model``."""

    model: str  # absolute folder path
    layer_range: Optional[tuple[int, int]]  # None: every layer (``models:`` form)
    parameters: dict[str, Setting]
    where: str  # e.g. 'models[1]' or 'slices[0].sources[1]', for messages


@dataclasses.dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SourceSlice, ...]
    base_model: Optional[str]
    parameters: dict[str, Setting]
    where: str


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A parsed MergeKit YAML. ``slices`` holds the ``models:`` form as one slice whose sources
    have ``layer_range=None`` (MergeKit's ``normalize_config``; the base model is appended as a
    source when it is not among the models). ``text``: the YAML as given."""

    merge_method: str
    base_model: Optional[str]
    slices: tuple[OutputSlice, ...]
    parameters: dict[str, Setting]
    dtype: Optional[str]
    out_dtype: Optional[str]
    from_models: bool
    text: str

    def referenced_models(self) -> list[str]:
        """Model folders in first-mention order (base model first when set)."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for s in self.slices:
            for src in s.sources:
                seen.setdefault(src.model, None)
        return list(seen)


def _check_keys(mapping: Any, valid: tuple[str, ...], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise UsageError(f"{where} must be a mapping with keys {', '.join(valid)}; got {type(mapping).__name__}")
    for key in mapping:
        if key in NOT_SUPPORTED:
            raise UsageError(f"{where}.{key}: {NOT_SUPPORTED[key]} (supported keys: {', '.join(valid)})")
        if key not in valid:
            raise UsageError(f"unknown key {where}.{key!s}; valid keys: {', '.join(valid)}")
    return mapping


def _setting(value: Any, where: str) -> Setting:
    """Parse one parameter setting (see the module docstring)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        m = _check_keys(value, ("filter", "value"), where)
        if "value" not in m:
            raise UsageError(f"{where}: a filtered setting needs a 'value'")
        f = m.get("filter")
        if f is not None and not isinstance(f, str):
            raise UsageError(f"{where}.filter must be a string, got {f!r}")
        inner = _setting(m["value"], f"{where}.value")
        if isinstance(inner, Conditional) or (isinstance(inner, list) and any(isinstance(e, Conditional) for e in inner)):
            raise UsageError(f"{where}.value must be a scalar or a list of scalars")
        return Conditional(inner, f)
    if isinstance(value, list):
        if not value:
            return []
        if all(isinstance(e, (bool, int, float, str)) for e in value):
            return list(value)
        if all(isinstance(e, dict) for e in value):
            return [_setting(e, f"{where}[{i}]") for i, e in enumerate(value)]
        raise UsageError(f"{where}: a list setting holds either scalars (a gradient) or {{filter, value}} entries, not both")
    raise UsageError(f"{where}: expected a scalar, a list or a {{filter, value}} mapping, got {value!r}")


def _parameters(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping of parameter names to settings")
    return {str(k): _setting(v, f"{where}.{k}") for k, v in value.items()}


def _model_path(value: Any, where: str, root: str) -> str:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where} must be a local model folder path, got {value!r}")
    path = value if os.path.isabs(value) else os.path.join(root, value)
    if not os.path.isdir(path) and ("+" in value or "@" in value):
        raise UsageError(f"{where} '{value}': LoRA (+) and revision (@) references are not supported; name a local folder")
    if not os.path.isdir(path):
        raise UsageError(f"{where}: model folder '{value}' does not exist (relative paths are taken from '{root}')")
    return os.path.abspath(path)


def _dtype(value: Any, key: str) -> Optional[str]:
    if value is None:
        return None
    name = str(value)
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name not in DTYPES:
        raise UsageError(f"{key}: unknown dtype {value!r}; valid: {', '.join(DTYPES)}")
    return name


def parse_config(text: str, root: Optional[str] = None) -> MergeConfig:
    """Parse MergeKit YAML ``text``; model paths are resolved against ``root`` (default: the
    current directory, as MergeKit does) and must be existing folders. Raises UsageError."""
    root = os.path.abspath(root or os.getcwd())
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"mergekit yaml: not valid YAML: {str(e).splitlines()[0]}") from None
    top = _check_keys(raw, TOP_KEYS, "mergekit yaml")
    method = top.get("merge_method")
    if not isinstance(method, str):
        raise UsageError("mergekit yaml: merge_method is required (a method name)")
    if top.get("tokenizer_source") is not None:
        raise UsageError(f"tokenizer_source: {top['tokenizer_source']!r} is not supported (only null: the base "
                         "model's tokenizer files are copied)")
    if ("models" in top) == ("slices" in top) or not (top.get("models") or top.get("slices")):
        raise UsageError("mergekit yaml: exactly one of 'models' or 'slices' must be given (a non-empty list)")
    base = _model_path(top["base_model"], "base_model", root) if top.get("base_model") is not None else None
    if "models" in top:
        if not isinstance(top["models"], list):
            raise UsageError("models must be a list of {model, parameters}")
        sources = []
        for i, m in enumerate(top["models"]):
            m = _check_keys(m, MODEL_KEYS, f"models[{i}]")
            sources.append(SourceSlice(_model_path(m.get("model"), f"models[{i}].model", root), None,
                                       _parameters(m.get("parameters"), f"models[{i}].parameters"), f"models[{i}]"))
        if base is not None and all(s.model != base for s in sources):
            sources.append(SourceSlice(base, None, {}, "base_model"))
        slices = (OutputSlice(tuple(sources), None, {}, "models"),)
    else:
        if not isinstance(top["slices"], list):
            raise UsageError("slices must be a list of {sources, base_model, parameters}")
        slices = []
        for i, s in enumerate(top["slices"]):
            s = _check_keys(s, SLICE_KEYS, f"slices[{i}]")
            if not isinstance(s.get("sources"), list) or not s["sources"]:
                raise UsageError(f"slices[{i}].sources must be a non-empty list")
            srcs = []
            for j, src in enumerate(s["sources"]):
                where = f"slices[{i}].sources[{j}]"
                src = _check_keys(src, SOURCE_KEYS, where)
                lr = src.get("layer_range")
                if not (isinstance(lr, list) and len(lr) == 2 and all(type(v) is int for v in lr)):
                    raise UsageError(f"{where}.layer_range must be [start, end) (two integers), got {lr!r}")
                if not 0 <= lr[0] < lr[1]:
                    raise UsageError(f"{where}.layer_range {lr} is empty or negative; need 0 <= start < end")
                srcs.append(SourceSlice(_model_path(src.get("model"), f"{where}.model", root), (lr[0], lr[1]),
                                        _parameters(src.get("parameters"), f"{where}.parameters"), where))
            lengths = {b - a for a, b in (x.layer_range for x in srcs)}
            if len(lengths) != 1:
                raise UsageError(f"slices[{i}]: all sources must span the same number of layers, got "
                                 f"{[list(x.layer_range) for x in srcs]}")
            sbase = _model_path(s["base_model"], f"slices[{i}].base_model", root) if s.get("base_model") else None
            slices.append(OutputSlice(tuple(srcs), sbase, _parameters(s.get("parameters"), f"slices[{i}].parameters"),
                                      f"slices[{i}]"))
        slices = tuple(slices)
    return MergeConfig(method, base, slices, _parameters(top.get("parameters"), "parameters"),
                       _dtype(top.get("dtype"), "dtype"), _dtype(top.get("out_dtype"), "out_dtype"), "models" in top, text)


def evaluate_setting(tensor_name: str, setting: Setting, t: float, validate) -> Any:
    """Value of ``setting`` for ``tensor_name`` at layer position ``t`` (None if no filter
    matches); ``validate`` checks / converts one scalar (see the module docstring)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return validate(setting)
    if not setting:
        return None
    if not isinstance(setting[0], Conditional):
        values = [validate(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(tensor_name, cond.value, t, validate)
    return None


__all__ = ["Conditional", "DTYPES", "MergeConfig", "OutputSlice", "SourceSlice", "TOP_KEYS", "evaluate_setting", "parse_config"]
