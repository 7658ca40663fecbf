import os
import sys

import numpy as np
import pytest
import torch

from astra import datasets as ds


def require(fn, *args):
    """Load a data source; skip when it is not installed, but fail in CI (which runs setup)."""
    try:
        return fn(*args)
    except ds.DataNotFoundError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@pytest.fixture
def fresh_austen_cache():
    ds._austen_by_var.cache_clear()
    yield
    ds._austen_by_var.cache_clear()


# Fashion-MNIST


def test_fashion_mnist_splits():
    train_x, train_y = require(ds.fashion_mnist, "train")
    val_x, val_y = ds.fashion_mnist("val")
    test_x, test_y = ds.fashion_mnist("test")
    assert train_x.shape == (55000, 28, 28) and val_x.shape == (5000, 28, 28)
    assert test_x.shape == (10000, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert np.bincount(val_y).tolist() == [500] * 10  # stratified
    assert np.bincount(train_y).tolist() == [5500] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
    assert len(ds.FASHION_MNIST_CLASSES) == 10

    # Disjoint and complete: val indices + the rest rebuild the official train set.
    raw_x, raw_y = ds._fashion_mnist_raw(ds._fashion_mnist_dir(), "train")
    val = ds.fashion_mnist_val_indices(raw_y)
    rest = np.setdiff1d(np.arange(60000), val)
    assert len(np.intersect1d(val, rest)) == 0 and len(val) + len(rest) == 60000
    np.testing.assert_array_equal(val_x, raw_x[val])
    np.testing.assert_array_equal(train_x, raw_x[rest])

    again_x, again_y = ds.fashion_mnist("val")  # deterministic
    np.testing.assert_array_equal(again_x, val_x)
    np.testing.assert_array_equal(again_y, val_y)


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("ASTRA_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(ds.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        ds.fashion_mnist("train")
    with pytest.raises(ValueError, match="unknown split"):
        ds.fashion_mnist("dev")


# Jane Austen


def test_austen_novels_and_splits(fresh_austen_cache):
    novels = require(ds.austen_novels)
    assert list(novels) == list(ds.AUSTEN_TITLES.values())
    assert 3_800_000 < sum(map(len, novels.values())) < 4_100_000
    assert novels["Pride & Prejudice"].splitlines()[0] == "PRIDE AND PREJUDICE"

    parts = {s: ds.austen_novel_splits(s) for s in ds.SPLITS}
    for title, text in novels.items():
        train, val, test = (parts[s][title] for s in ds.SPLITS)
        assert train + val + test == text  # contiguous, disjoint, complete
        assert val.lstrip().lower().startswith("chapter")  # cut at chapter headings
        assert test.lstrip().lower().startswith("chapter")
        assert 0.8 < len(train) / len(text) < 0.95
        assert 0.01 < len(val) / len(text) < 0.1 and 0.01 < len(test) / len(text) < 0.1

    val_text, test_text = ds.austen_text("val"), ds.austen_text("test")
    assert ds.austen_text("val") == val_text  # deterministic
    train_text = ds.austen_text("train")
    for probe in (val_text[1000:1200], test_text[5000:5200]):
        assert probe not in train_text


def test_austen_text_cache_serves_later_reads(tmp_path, monkeypatch, fresh_austen_cache):
    src = require(ds._austen_data_dir)
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path))
    monkeypatch.setenv("ASTRA_AUSTEN_DIR", str(src))
    novels = ds.austen_novels()
    assert sorted(p.name for p in (tmp_path / "data" / "austen").iterdir()) == sorted(
        f"{var}.txt" for var in ds.AUSTEN_TITLES
    )
    ds._austen_by_var.cache_clear()
    monkeypatch.setenv("ASTRA_AUSTEN_DIR", str(tmp_path / "gone"))
    monkeypatch.setattr(ds, "AUSTEN_R_DIR", tmp_path / "gone")
    assert ds.austen_novels() == novels  # from the .txt cache, no R data needed


def test_austen_missing(tmp_path, monkeypatch, fresh_austen_cache):
    monkeypatch.setenv("ASTRA_HOME", str(tmp_path))
    monkeypatch.setenv("ASTRA_AUSTEN_DIR", str(tmp_path / "nothing"))
    monkeypatch.setattr(ds, "AUSTEN_R_DIR", tmp_path / "nothing")
    with pytest.raises(ds.DataNotFoundError) as e:
        ds.austen_text("train")
    assert "apt-get download r-cran-janeaustenr && dpkg -x" in str(e.value)
    assert "scripts/setup.sh" in str(e.value)


class WordTokenizer:
    """Whitespace tokenizer with the HF call signature: one id per word."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [len(w) for w in text.split()]}


def test_token_blocks():
    text = "\n".join(" ".join("x" * (1 + (i * 7 + j) % 5) for j in range(10)) for i in range(50))
    every = WordTokenizer()(text)["input_ids"]
    blocks = ds.token_blocks(WordTokenizer(), text, seq_len=16, max_blocks=3)
    assert blocks.dtype == torch.long and blocks.shape == (3, 16)
    assert blocks.flatten().tolist() == every[:48]  # contiguous, from the start
    full = ds.token_blocks(WordTokenizer(), text, seq_len=16)
    assert full.shape == (len(every) // 16, 16)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        ds.token_blocks(WordTokenizer(), "a b c", seq_len=16)


# scikit-image photos


def test_sample_photos():
    pytest.importorskip("skimage")
    photos = ds.sample_photos()
    assert list(photos) == list(ds.SAMPLE_PHOTOS) and len(photos) == 14
    for x in photos.values():
        assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3
    assert photos["horse"].max() == 255  # binary image scaled, not left as 0/1


def test_sample_photos_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ds.DataNotFoundError, match="pip install scikit-image==0.26.0"):
        ds.sample_photos()
