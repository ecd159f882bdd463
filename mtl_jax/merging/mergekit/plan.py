"""The output tensors of a MergeKit config, each with its inputs and resolved parameters, checked
before anything is read or written.

Follows ``mergekit/plan.py`` (0.1.5): the output is the embeddings (from the first slice's
sources, ``t = 0``), then every layer of every slice in order (output layer ``k`` of a slice of
``L`` layers takes layer ``start + k`` of each source, ``t = k / (L - 1)``, or 1 for ``L = 1``),
then the final norm and ``lm_head`` (from the last slice's sources, ``t = 0``). ``lm_head`` is
written when some input has one; an input without it (tied embeddings) contributes its
embeddings. Parameters resolve in MergeKit's precedence: the source's own ``parameters``
(per-input parameters only), the slice's, the top level's, the method default; per-input
filters match the input tensor name, shared ones the output name. An input holding a tensor outside
the template (e.g. ``q_proj.bias`` of ``attention_bias: true``) is refused by name: MergeKit's
template drops such tensors from the output silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from mtl_jax.errors import UsageError
from mtl_jax.merging.mergekit.config import MergeConfig, OutputSlice, Setting, evaluate_setting
from mtl_jax.merging.mergekit.methods import MISSING, NUMPY_DTYPES, MethodSpec, Param, method_spec, promoted_dtype
from mtl_jax.merging.mergekit.model_folder import (
    LAYER_WEIGHTS,
    LM_HEAD,
    NORM_WEIGHT,
    PRE_WEIGHTS,
    TIED_TO,
    ModelFolder,
    layer_weight,
)


@dataclasses.dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model: ``inputs`` are (model path, tensor name) pairs, ``base``
    the base's index among them (None if the method has none), ``work_dtype`` MergeKit's
    working dtype, ``out_dtype`` the written dtype."""

    name: str
    shape: tuple[int, ...]
    inputs: tuple[tuple[str, str], ...]
    base: Optional[int]
    shared: dict[str, Any]
    per_input: tuple[dict[str, Any], ...]
    work_dtype: np.dtype
    out_dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.out_dtype.itemsize


@dataclasses.dataclass(frozen=True)
class MergePlan:
    method: MethodSpec
    tensors: tuple[OutputTensor, ...]
    donor: str  # the folder whose config.json / tokenizer files are copied
    num_layers: int  # output num_hidden_layers
    layers_changed: bool  # slices form: num_hidden_layers is rewritten


def _check_parameter_names(cfg: MergeConfig, spec: MethodSpec) -> None:
    valid = ", ".join(p.name for p in spec.params)
    scopes: list[tuple[str, dict[str, Setting], bool]] = [("parameters", cfg.parameters, True)]
    for s in cfg.slices:
        scopes.append((f"{s.where}.parameters", s.parameters, True))
        scopes += [(f"{src.where}.parameters", src.parameters, False) for src in s.sources]
    for where, params, shared_ok in scopes:
        for name in params:
            p = spec.param(name)
            if p is None:
                raise UsageError(f"{where}.{name}: unknown parameter for merge_method {spec.name!r}; valid: {valid}")
            if p.scope == "shared" and not shared_ok:
                raise UsageError(f"{where}.{name}: {name!r} is shared by all inputs of {spec.name!r}; set it in the "
                                 "top-level (or slice) parameters")


def _resolve(p: Param, scopes: list[dict[str, Setting]], tensor: str, t: float, who: str) -> Any:
    for scope in scopes:
        if p.name in scope:
            value = evaluate_setting(tensor, scope[p.name], t, p.validate)
            if value is not None:
                return value
    if p.default is MISSING:
        raise UsageError(f"merge_method needs parameter {p.name!r} for {who} (tensor {tensor}); set it in its parameters")
    return p.validate(p.default)


def _validate_inputs(spec: MethodSpec, models: list[str], base: Optional[str], where: str) -> None:
    if len(set(models)) != len(models):
        raise UsageError(f"{where}: a model is listed twice ({models})")
    base = None if spec.base == "ignored" else base
    if base is not None and base not in models:
        raise UsageError(f"{where}: the base model '{base}' is not among the sources")
    if spec.base == "required" and base is None:
        raise UsageError(f"{where}: merge_method {spec.name!r} needs a base_model")
    if len(models) < spec.min_inputs or (spec.max_inputs is not None and len(models) > spec.max_inputs):
        want = (f"exactly {spec.min_inputs}" if spec.min_inputs == spec.max_inputs else
                f"at least {spec.min_inputs}" if spec.max_inputs is None else f"at most {spec.max_inputs}")
        raise UsageError(f"{where}: merge_method {spec.name!r} takes {want} inputs (the base included), got {len(models)}")


def _open_models(cfg: MergeConfig) -> dict[str, ModelFolder]:
    models: dict[str, ModelFolder] = {}
    try:
        for path in cfg.referenced_models():
            models[path] = ModelFolder(path)
    except BaseException:
        for m in models.values():
            m.close()
        raise
    return models


def _check_compatible(models: dict[str, ModelFolder], donor: str) -> None:
    """Same architecture and vocabulary everywhere, and no input tensor that the output would leave out."""
    ref = models[donor]
    for path, m in models.items():
        if m.architecture != ref.architecture:
            raise UsageError(f"architectures differ: '{donor}' is {ref.architecture}, '{path}' is {m.architecture}")
        if m.vocab_size != ref.vocab_size:
            raise UsageError(f"vocab sizes differ: '{donor}' has {ref.vocab_size}, '{path}' has {m.vocab_size} "
                             "(tokenizer merging is not supported)")
        outside = m.outside_template()
        if outside:
            more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
            raise UsageError(f"'{path}' holds tensors outside the Llama template that the merge would drop "
                             f"(MergeKit's llama template drops them too): {', '.join(outside[:3])}{more}; "
                             "merging them is not supported")


def build_plan(cfg: MergeConfig, models: dict[str, ModelFolder]) -> MergePlan:
    """Every output tensor with its inputs and parameters; UsageError on the first problem."""
    spec = method_spec(cfg.merge_method)
    _check_parameter_names(cfg, spec)
    donor = cfg.base_model or cfg.referenced_models()[0]
    _check_compatible(models, donor)
    for i, s in enumerate(cfg.slices):
        _validate_inputs(spec, [src.model for src in s.sources], s.base_model or cfg.base_model, s.where)
        for src in s.sources:
            depth = models[src.model].num_layers
            if src.layer_range is not None and src.layer_range[1] > depth:
                raise UsageError(f"{src.where}.layer_range {list(src.layer_range)} goes past the {depth} layers of "
                                 f"'{src.model}'")
    tensors: list[OutputTensor] = []

    def add(out_name: str, s: OutputSlice, in_names: list[str], t: float) -> None:
        base = s.base_model or cfg.base_model
        sources = list(s.sources)
        pairs = [(src.model, name) for src, name in zip(sources, in_names)]
        for model, name in pairs:
            if not models[model].has(name):
                raise UsageError(f"tensor '{name}' is missing from '{model}'")
        shapes = {models[m].specs[n].shape for m, n in pairs}
        if len(shapes) != 1:
            raise UsageError(f"tensor shapes differ at '{out_name}': " +
                             ", ".join(f"'{m}' {models[m].specs[n].shape}" for m, n in pairs))
        dtypes = [np.dtype(models[m].specs[n].dtype) for m, n in pairs]
        if not all(np.issubdtype(d, np.floating) or d == NUMPY_DTYPES["bfloat16"] for d in dtypes):
            raise UsageError(f"tensor '{out_name}' is not floating point in every input ({dtypes})")
        work = NUMPY_DTYPES[cfg.dtype] if cfg.dtype else promoted_dtype(dtypes)
        out = NUMPY_DTYPES[cfg.out_dtype] if cfg.out_dtype else work
        shared_scopes = [s.parameters, cfg.parameters]
        shared = {p.name: _resolve(p, shared_scopes, out_name, t, "the merge")
                  for p in spec.params if p.scope == "shared"}
        base_index = next((i for i, src in enumerate(sources) if src.model == base), None) if spec.base != "ignored" else None
        per_input = []
        for i, (src, name) in enumerate(zip(sources, in_names)):
            scopes = [src.parameters, s.parameters, cfg.parameters]
            per_input.append({p.name: _resolve(p, scopes, name, t, src.where) for p in spec.params
                              if p.scope == "input" or (p.scope == "non_base" and i != base_index)})
        tensors.append(OutputTensor(out_name, shapes.pop(), tuple(pairs), base_index, shared, tuple(per_input), work, out))

    first, last = cfg.slices[0], cfg.slices[-1]
    for name in PRE_WEIGHTS:
        add(name, first, [name] * len(first.sources), 0.0)
    out_layer = 0
    for s in cfg.slices:
        ranges = [src.layer_range or (0, models[src.model].num_layers) for src in s.sources]
        depths = {b - a for a, b in ranges}
        if len(depths) != 1:
            raise UsageError(f"{s.where}: the models have different numbers of layers "
                             f"({', '.join(f'{src.model}: {b - a}' for src, (a, b) in zip(s.sources, ranges))})")
        length = depths.pop()
        for k in range(length):
            t = k / (length - 1) if length > 1 else 1.0
            for suffix in LAYER_WEIGHTS:
                add(layer_weight(out_layer, suffix), s, [layer_weight(a + k, suffix) for a, _ in ranges], t)
            out_layer += 1
    add(NORM_WEIGHT, last, [NORM_WEIGHT] * len(last.sources), 0.0)
    if any(models[src.model].has(LM_HEAD) for src in last.sources):
        heads = [LM_HEAD if models[src.model].has(LM_HEAD) else TIED_TO for src in last.sources]
        add(LM_HEAD, last, heads, 0.0)
    return MergePlan(spec, tuple(tensors), donor, out_layer, not cfg.from_models)


__all__ = ["MergePlan", "OutputTensor", "build_plan"]
