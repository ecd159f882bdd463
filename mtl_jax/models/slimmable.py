"""A slimmable multi-task network: one set of parameters, run at any allowed width configuration.

Aich et al. (ICCV 2023), "Efficient Controllable Multi-Task Architectures" (method; only the abstract was available here): a shared
encoder and one decoder per task, each *slimmable* (Yu et al. 2019, "Slimmable Neural Networks"):
at width multiplier w a layer uses the first round(w * C) of its C output channels (and the
first channels of its input that the previous layer produced), so the same parameters run at
every width without retraining. A width configuration is one multiplier for the encoder and one
per task decoder (``WidthConfig``); the user's compute budget and task preferences pick one
(``mtl_jax.train.slimmable.search_widths``)::

    x [B, H, W, C] -> encoder: (conv k x k -> maxpool 2 -> relu) per entry of encoder_features
                   -> features [B, h, w, round(w_enc * C_enc)]                 (shared)
                   -> decoder t: dense over (positions x channels) -> relu -> ... -> dense n_t

Parameters (full width)::

    shared/conv_{i}/{kernel [k, k, C_in, C_i], bias}
    heads/<task>/dense_0/{kernel [h*w, C_enc, H_0], bias}, dense_{j}/..., out/...

``model.apply(v, x)`` runs the full width (so the standard trainer trains it as is);
``model.apply(v, x, widths=cfg)`` runs configuration ``cfg`` and
``model.apply(v, x, widths=cfg, method=SlimmableMTL.forward)`` also returns the encoder features
(for CIKD). The configuration is static: jit with it as a static argument (one compilation per
configuration). Deviations: the paper slims ResNet / ViT encoders with dense-prediction decoders
and switchable normalisation; this LeNet-like network has no normalisation layers, so no
per-width statistics are needed.
"""

from __future__ import annotations

import itertools
from typing import Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtl_jax.models.blocks import PerTask, as_float


class WidthConfig(NamedTuple):
    """A runtime width configuration: ``encoder`` multiplier and ``decoders`` = ((task, multiplier), ...)
    in task order. Hashable, so it can be a static jit argument."""

    encoder: float
    decoders: tuple

    def decoder(self, task: str) -> float:
        return dict(self.decoders)[task]

    def __str__(self) -> str:
        return f"enc {self.encoder:g}; " + ", ".join(f"{t} {w:g}" for t, w in self.decoders)


def width_config(encoder: float, decoders: Mapping[str, float] | float, tasks: Sequence[str]) -> WidthConfig:
    """``WidthConfig`` from an encoder multiplier and ``{task: multiplier}`` (or one multiplier for all)."""
    if not isinstance(decoders, Mapping):
        decoders = {t: decoders for t in tasks}
    if sorted(decoders) != sorted(tasks):
        raise ValueError(f"decoder widths name tasks {sorted(decoders)}; the model's tasks are {list(tasks)}")
    return WidthConfig(float(encoder), tuple((t, float(decoders[t])) for t in tasks))


def all_width_configs(widths: Sequence[float], tasks: Sequence[str]) -> list[WidthConfig]:
    """Every configuration: |widths|^(1 + K) of them, encoder-major."""
    return [WidthConfig(float(e), tuple(zip(tasks, map(float, d))))
            for e in widths for d in itertools.product(widths, repeat=len(tasks))]


def slim_channels(full: int, width: float) -> int:
    """Channels a layer of ``full`` channels uses at multiplier ``width``: round(width * full), at least 1."""
    return max(1, int(round(full * width)))


class SlimConv(nn.Module):
    """k x k convolution with ``features`` outputs over ``in_features`` inputs at full width; the
    call uses the first ``x.shape[-1]`` input and ``out_features`` output channels.
    x [B, H, W, c_in] -> [B, H', W', out_features]."""

    features: int
    in_features: int
    kernel_size: int = 5
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x, out_features: int):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, self.in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jax.lax.conv_general_dilated(x, kernel[:, :, : x.shape[-1], :out_features].astype(x.dtype), (1, 1),
                                         self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias[:out_features]


class SlimDense(nn.Module):
    """Dense layer slimmable on both sides. x [B, c_in] with kernel [in_features, features], or
    x [B, P, c_in] (P positions, e.g. flattened pixels) with kernel [P, in_features, features]:
    y = sum_{p, i < c_in} x[b, p, i] kernel[p, i, :out] + bias[:out]  -> [B, out_features]."""

    features: int
    in_features: int

    @nn.compact
    def __call__(self, x, out_features: int):
        positions = () if x.ndim == 2 else (x.shape[1],)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*positions, self.in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        kernel = kernel[..., : x.shape[-1], :out_features].astype(x.dtype)
        y = x @ kernel if x.ndim == 2 else jnp.einsum("bpc,pco->bo", x, kernel)
        return y + bias[:out_features]


class SlimEncoder(nn.Module):
    """The shared encoder at multiplier ``width``: x [B, H, W, C] -> [B, h, w, round(width * features[-1])]."""

    features: Sequence[int] = (20, 40)
    kernel_size: int = 5
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x, width: float):
        x = as_float(x)
        in_features = x.shape[-1]
        for i, features in enumerate(self.features):
            conv = SlimConv(features, in_features, self.kernel_size, self.padding, name=f"conv_{i}")
            x = nn.relu(nn.max_pool(conv(x, slim_channels(features, width)), (2, 2), (2, 2)))
            in_features = features
        return x


class SlimDecoder(nn.Module):
    """Task decoder at multiplier ``width``: features [B, h, w, c] -> dense over all positions and
    channels (``hidden[0]`` units), ``Dense -> relu`` per further entry of ``hidden`` (all slimmed),
    then the full ``num_outputs`` logits. ``in_features``: the encoder's full channel count."""

    num_outputs: int
    in_features: int
    hidden: Sequence[int] = (128,)

    @nn.compact
    def __call__(self, h, width: float, train: bool = False):
        x = h.reshape(h.shape[0], -1, h.shape[-1])
        in_features = self.in_features
        for i, features in enumerate(self.hidden):
            x = nn.relu(SlimDense(features, in_features, name=f"dense_{i}")(x, slim_channels(features, width)))
            in_features = features
        return SlimDense(self.num_outputs, in_features, name="out")(x, self.num_outputs)


class SlimmableMTL(nn.Module):
    """Slimmable shared encoder + slimmable task decoders (Aich et al., ICCV 2023).

    ``tasks``: ((task name, outputs), ...); ``widths``: the allowed multipliers (the largest is the
    full model). ``apply(v, x, widths=WidthConfig | None)`` -> {task: [B, n_t]}.
    """

    tasks: tuple
    encoder_features: Sequence[int] = (20, 40)
    decoder_hidden: Sequence[int] = (128,)
    kernel_size: int = 5
    padding: str = "VALID"
    widths: Sequence[float] = (0.25, 0.5, 0.75, 1.0)

    @property
    def task_names(self) -> tuple:
        return tuple(t for t, _ in self.tasks)

    def full_width(self) -> WidthConfig:
        return width_config(max(self.widths), max(self.widths), self.task_names)

    def smallest(self) -> WidthConfig:
        return width_config(min(self.widths), min(self.widths), self.task_names)

    def configurations(self) -> list[WidthConfig]:
        return all_width_configs(sorted(self.widths), self.task_names)

    def check(self, widths: WidthConfig) -> WidthConfig:
        """``widths`` if it is a valid configuration of this model, else ValueError naming the problem."""
        if not isinstance(widths, WidthConfig):
            raise ValueError(f"widths must be a WidthConfig (see width_config); got {widths!r}")
        tasks = tuple(t for t, _ in widths.decoders)
        if tasks != self.task_names:
            raise ValueError(f"width configuration names decoders {list(tasks)}; the model's tasks are "
                             f"{list(self.task_names)}")
        for part, w in (("encoder", widths.encoder), *((f"decoder '{t}'", w) for t, w in widths.decoders)):
            if w not in self.widths:
                raise ValueError(f"width {w:g} for the {part} is not an allowed width; allowed widths: "
                                 f"{sorted(self.widths)}")
        return widths

    @nn.compact
    def forward(self, x, train: bool = False, widths: WidthConfig | None = None):
        """(encoder features [B, h, w, c_enc], {task: [B, n_t]}) at ``widths`` (None: full width)."""
        widths = self.check(self.full_width() if widths is None else widths)
        features = SlimEncoder(self.encoder_features, self.kernel_size, self.padding, name="shared")(x, widths.encoder)
        decoders = {t: SlimDecoder(n, self.encoder_features[-1], self.decoder_hidden, parent=None) for t, n in self.tasks}
        preds = PerTask(decoders, name="heads")({t: (features, widths.decoder(t), train) for t in decoders})
        return features, preds

    def __call__(self, x, train: bool = False, widths: WidthConfig | None = None):
        return self.forward(x, train, widths)[1]
