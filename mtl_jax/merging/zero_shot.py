"""Frozen zero-shot classification heads from CLIP's text tower for the 8 tasks of the ViT-B/32
merging benchmark (task arithmetic, Ilharco et al. ICLR 2023; TIES; AdaMerging; FusionBench).

A task's head is built once from the pretrained text tower and kept frozen while image encoders
are fine-tuned and merged: for every class, each prompt template is filled with the class name,
tokenised and embedded; the normalised embeddings are averaged and normalised again (Radford et
al. 2021, Sec. 3.1.4; open_clip ``build_zero_shot_classifier``; task_vectors ``get_zeroshot_classifier``)
-> weights [C, E]. Logits of images [B, H, W, 3] are ``exp(logit_scale) * normalise(image_embedding) @ weights.T``,
which :class:`ZeroShotTrunk` (unit-norm embedding) + :func:`classification_head` (a ``LinearHead``
with kernel ``exp(logit_scale) * weights.T`` and zero bias) compute as trunk + linear head.

Prompt templates: task_vectors' ``src/datasets/templates.py`` (FusionBench's
``fusion_bench/tasks/clip_classification/*.py`` holds the same ones). Class names come from the
class folders (:mod:`mtl_jax.data.image_folder`), so each name is attached to its own folder
whatever the folder order: EuroSAT folder names (``AnnualCrop`` ...) and GTSRB class indices
(``00000`` ... ``00042``) map to the official CLIP names (task_vectors / FusionBench lists);
SUN397 folders as task_vectors prepares them (``a_abbey``) lose the one-letter prefix; every other
folder name has ``_`` replaced by a space (Cars, RESISC45, DTD, MNIST and SVHN folders then equal
the official names). ``overrides`` (``{folder: name}``) replaces any of them.

Tokenisation: a Hugging Face ``tokenizer.json`` of CLIP's BPE (``openai/clip-vit-base-patch32``
ships one; the same vocabulary as open_clip's ``bpe_simple_vocab_16e6.txt.gz``), token ids
``[<|startoftext|>] + ids[:context - 2] + [<|endoftext|>]`` zero-padded to the context length
(open_clip ``tokenize``: truncated prompts end in the end-of-text token).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.models.pretrained.clip import CLIPImageEncoder, CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, \
    l2_normalize, zero_shot_head
from mtl_jax.registry import lookup

# The benchmark's tasks in the order of its tables (Ilharco et al. 2023; Yang et al. 2024).
DATASETS = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
DISPLAY_NAMES = {"sun397": "SUN397", "cars": "Cars", "resisc45": "RESISC45", "eurosat": "EuroSAT", "svhn": "SVHN",
                 "gtsrb": "GTSRB", "mnist": "MNIST", "dtd": "DTD"}

_RESISC45 = ("satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}.", "aerial photo of {}.",
             "satellite view of {}.", "aerial view of {}.")
TEMPLATES = {
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
             "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."),
    "resisc45": _RESISC45 + tuple(t.replace("{}", "a {}") for t in _RESISC45)
    + tuple(t.replace("{}", "the {}") for t in _RESISC45),
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "svhn": ('a photo of the number: "{}".',),
    "gtsrb": ('a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'),
    "mnist": ('a photo of the number: "{}".',),
    "dtd": tuple(f"a photo of {article} {{}} {noun}." for article in ("a", "the")
                 for noun in ("texture", "pattern", "thing", "object")),
}

EUROSAT_NAMES = {  # folder -> CLIP's name (task_vectors src/datasets/eurosat.py ``ours_to_open_ai``)
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}

GTSRB_NAMES = (  # class index -> CLIP's name (FusionBench fusion_bench/tasks/clip_classification/gtsrb.py)
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory", "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory", "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)


def class_name(dataset: str, folder: str) -> str:
    """The CLIP class name of class folder ``folder`` of ``dataset`` (module docstring)."""
    lookup(TEMPLATES, dataset, "CLIP benchmark dataset")
    if dataset == "eurosat" and folder in EUROSAT_NAMES:
        return EUROSAT_NAMES[folder]
    if dataset == "gtsrb" and folder.isdigit() and int(folder) < len(GTSRB_NAMES):
        return GTSRB_NAMES[int(folder)]
    if dataset == "sun397" and re.match(r"^[a-z]_", folder):
        folder = folder[2:]
    return folder.replace("_", " ")


def class_names(dataset: str, folders: Sequence[str], overrides: Mapping[str, str] | None = None) -> list[str]:
    """:func:`class_name` of every folder, ``overrides[folder]`` where given."""
    overrides = dict(overrides or {})
    return [overrides[f] if f in overrides else class_name(dataset, f) for f in folders]


def prompts(dataset: str, names: Sequence[str], templates: Sequence[str] | None = None) -> list[list[str]]:
    """``[C][T]`` prompt strings: each template of ``dataset`` (or ``templates``) filled with each class name."""
    if templates is None:
        templates = lookup(TEMPLATES, dataset, "CLIP benchmark dataset")
    return [[t.format(n) for t in templates] for n in names]


class CLIPTokenizer:
    """CLIP's BPE from a Hugging Face ``tokenizer.json``: ``tokenizer(texts)`` -> int32 [N, context]
    (module docstring). The start / end-of-text ids are the vocabulary's ``<|startoftext|>`` /
    ``<|endoftext|>``."""

    SOT, EOT = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, path: str | os.PathLike, context_length: int = 77):
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP tokenizer file {path!r} does not exist (a Hugging Face tokenizer.json, "
                                    "e.g. from openai/clip-vit-base-patch32)")
        self.tokenizer = Tokenizer.from_file(path)
        ids = [self.tokenizer.token_to_id(t) for t in (self.SOT, self.EOT)]
        if None in ids:
            raise ValueError(f"tokenizer {path!r} has no {self.SOT!r} / {self.EOT!r} tokens: not a CLIP tokenizer")
        self.sot_id, self.eot_id = ids
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), np.int32)
        for i, encoding in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = [self.sot_id] + list(encoding.ids)[: self.context_length - 2] + [self.eot_id]
            out[i, : len(ids)] = ids
        return out


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: CLIPTextConfig, params, ids):
    return CLIPTextEncoder(config).apply({"params": params}, ids)


def encode_texts(config: CLIPTextConfig, params, ids: np.ndarray, batch: int = 256) -> np.ndarray:
    """Text embeddings [N, E] of token ids [N, L] (``params``: a :class:`CLIPTextEncoder`'s), in
    zero-padded batches of ``batch`` (one compile)."""
    batch = min(batch, len(ids))
    pad = -len(ids) % batch
    padded = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)]) if pad else ids
    out = [np.asarray(_encode(config, params, jnp.asarray(padded[i:i + batch]))) for i in range(0, len(padded), batch)]
    return np.concatenate(out)[: len(ids)]


def zero_shot_weights(config: CLIPTextConfig, text_params, tokenizer: CLIPTokenizer,
                      class_prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """The zero-shot classifier [C, E] of ``class_prompts`` ``[C][T]`` (every class the same T):
    ``normalise(mean_t normalise(text(prompt_ct)))`` (:func:`mtl_jax.models.pretrained.clip.zero_shot_head`)."""
    counts = {len(p) for p in class_prompts}
    if len(counts) != 1:
        raise ValueError(f"every class needs the same number of prompts, got {sorted(counts)}")
    flat = [p for per_class in class_prompts for p in per_class]
    embeddings = encode_texts(config, text_params, tokenizer(flat))
    return np.asarray(zero_shot_head(jnp.asarray(embeddings.reshape(len(class_prompts), counts.pop(), -1)))).T


def classification_head(weights, logit_scale) -> dict:
    """``LinearHead`` params ``{"out": {"kernel": exp(logit_scale) * weights.T [E, C], "bias": 0 [C]}}``:
    on :class:`ZeroShotTrunk` features, CLIP's zero-shot logits (task_vectors ``ClassificationHead``)."""
    weights = jnp.asarray(weights, jnp.float32)
    return {"out": {"kernel": jnp.exp(jnp.float32(logit_scale)) * weights.T,
                    "bias": jnp.zeros((weights.shape[0],), jnp.float32)}}


@dataclasses.dataclass(frozen=True)
class ZeroShotTrunk:
    """CLIP's image tower as the trunk of a frozen zero-shot head: ``apply({"params": p}, images)``
    -> unit-norm image embeddings [B, E] (``p``: a :class:`CLIPImageEncoder`'s parameters)."""

    config: CLIPVisionConfig

    def apply(self, variables, images, train: bool = False):
        return l2_normalize(CLIPImageEncoder(self.config).apply(variables, images, train))


__all__ = ["CLIPTokenizer", "DATASETS", "DISPLAY_NAMES", "EUROSAT_NAMES", "GTSRB_NAMES", "TEMPLATES",
           "ZeroShotTrunk", "class_name", "class_names", "classification_head", "encode_texts", "prompts",
           "zero_shot_weights"]
