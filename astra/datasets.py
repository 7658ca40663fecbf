"""Data sets without a hub: Fashion-MNIST (Debian), Jane Austen's novels and Moby-Dick (Debian
R packages), scikit-image sample photos, and any UTF-8 text file a user names. Every split is
deterministic and needs no network.
"""

from __future__ import annotations

import gzip
import os
import re
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from astra.hub import cache_dir
from astra.storage import write_text

SPLITS = ("train", "val", "test")


class DataNotFoundError(FileNotFoundError):
    pass


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


# Fashion-MNIST

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_VAL_PER_CLASS = 500  # 5000 val images, 10 classes
FASHION_MNIST_SEED = 0


def _fashion_mnist_dir() -> Path:
    d = Path(os.environ.get("ASTRA_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if not (d / "t10k-labels-idx1-ubyte.gz").is_file():
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {d}; install it with "
            "`sudo apt-get install dataset-fashion-mnist` (or `bash scripts/setup.sh`)"
        )
    return d


@lru_cache(maxsize=2)
def _fashion_mnist_raw(d: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(d / f"{part}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(d / f"{part}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{d}: {len(images)} {part} images but {len(labels)} labels")
    return images, labels


def fashion_mnist_val_indices(labels: np.ndarray) -> np.ndarray:
    """Stratified val subset of the official train set: 500 images per class, chosen by a
    fixed-seed permutation within each class, returned in ascending (original) order."""
    rng = np.random.default_rng(FASHION_MNIST_SEED)
    picks = [
        rng.permutation(np.flatnonzero(labels == c))[:FASHION_MNIST_VAL_PER_CLASS]
        for c in range(len(FASHION_MNIST_CLASSES))
    ]
    return np.sort(np.concatenate(picks))


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)). train 55000 / val 5000 (both from the
    official train set, stratified, disjoint) / test 10000 (official t10k)."""
    _check_split(split)
    d = _fashion_mnist_dir()
    if split == "test":
        images, labels = _fashion_mnist_raw(d, "t10k")
        return images.copy(), labels.copy()
    images, labels = _fashion_mnist_raw(d, "train")
    val = fashion_mnist_val_indices(labels)
    if split == "val":
        idx = val
    else:
        keep = np.ones(len(labels), bool)
        keep[val] = False
        idx = np.flatnonzero(keep)
    return images[idx], labels[idx]


# Jane Austen

AUSTEN_TITLES = {  # R variable name -> title, in publication order (janeaustenr's order)
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_R_DIR = Path("/usr/lib/R/site-library/janeaustenr")  # when apt-installed
AUSTEN_FRACTIONS = (0.90, 0.05, 0.05)  # train / val / test, per novel, whole chapters
_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\s*$", re.IGNORECASE)
_AUSTEN_HINT = (
    "get it with `cd /tmp && apt-get download r-cran-janeaustenr && "
    "dpkg -x r-cran-janeaustenr_*.deb {dest}` (or `bash scripts/setup.sh`); "
    "`apt-get install r-cran-janeaustenr` also works but pulls in R"
)


def austen_cache_dir() -> Path:
    return cache_dir() / "data" / "austen"


def _r_roots(env: str, extracted: Path, installed: Path) -> list[Path]:
    """Where an R package's data may be: $env, its .deb extracted under the cache (by
    scripts/setup.sh), or the apt-installed package."""
    return ([Path(os.environ[env])] if os.environ.get(env) else []) + [extracted, installed]


def _find_r_data(roots: list[Path], package: str) -> Path | None:
    """The first folder under `roots` holding the package's data/Rdata.rdb + .rdx."""
    for root in roots:
        for d in (root, root / "data", root / f"usr/lib/R/site-library/{package}/data"):
            if (d / "Rdata.rdb").is_file() and (d / "Rdata.rdx").is_file():
                return d
    return None


def _read_rdb(d: Path, names) -> dict[str, object]:
    """The named objects of an R package's lazy-load data base (data/Rdata.rdb + .rdx),
    converted by rdata: an R character vector becomes a numpy string array."""
    import rdata  # optional dependency: pip install -e '.[assets]'

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unknown file type", UserWarning)  # lazy-load blobs
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((d / "Rdata.rdx").read_bytes()))
    rdb = (d / "Rdata.rdb").read_bytes()
    # Each object: 4-byte length header, then a zlib stream of the serialised R object.
    return {
        str(var): parse(zlib.decompress(rdb[offset + 4 : offset + length]))
        for var, (offset, length) in index["variables"].items()
        if str(var) in names
    }


def _r_package_data_dir(env: str, package: str, installed: Path, what: str, hint: str) -> Path:
    """Folder holding an R package's Rdata.rdb/.rdx: $`env`, the deb extracted under
    cache_dir()/data/`package`, or the apt-installed package; else a DataNotFoundError naming
    every place looked and how to get it."""
    extracted = cache_dir() / "data" / package
    roots = _r_roots(env, extracted, installed)
    found = _find_r_data(roots, package)
    if found is None:
        raise DataNotFoundError(
            f"{what} not found (looked in {', '.join(map(str, roots))}); "
            + hint.format(dest=extracted)
        )
    return found


def _austen_data_dir() -> Path:
    return _r_package_data_dir(
        "ASTRA_AUSTEN_DIR", "janeaustenr", AUSTEN_R_DIR, "Jane Austen novels", _AUSTEN_HINT
    )


def _read_austen_rdb(d: Path) -> dict[str, str]:
    novels = {  # one R string per line of the novel
        var: "\n".join(str(line) for line in lines)
        for var, lines in _read_rdb(d, AUSTEN_TITLES).items()
    }
    missing = AUSTEN_TITLES.keys() - novels.keys()
    if missing:
        raise DataNotFoundError(f"{d}/Rdata.rdb lacks {sorted(missing)}; is it janeaustenr?")
    return novels


@lru_cache(maxsize=1)
def _austen_by_var() -> dict[str, str]:
    cached = austen_cache_dir()
    files = {var: cached / f"{var}.txt" for var in AUSTEN_TITLES}
    if all(f.is_file() for f in files.values()):
        return {var: f.read_text(encoding="utf-8") for var, f in files.items()}
    novels = _read_austen_rdb(_austen_data_dir())
    cached.mkdir(parents=True, exist_ok=True)
    for var, f in files.items():
        write_text(f, novels[var])
    return novels


def austen_novels() -> dict[str, str]:
    """title -> full text (lines joined with newlines), six novels in publication order.
    The first read extracts them to cache_dir()/data/austen/*.txt; later reads use those."""
    novels = _austen_by_var()
    return {title: novels[var] for var, title in AUSTEN_TITLES.items()}


def chapter_starts(text: str, heading: re.Pattern = _CHAPTER) -> list[int]:
    """Character offsets of the chapter headings (Austen's: "CHAPTER IV", "Chapter 12")."""
    starts, pos = [], 0
    for line in text.split("\n"):
        if heading.match(line):
            starts.append(pos)
        pos += len(line) + 1
    return starts


def _split_bounds(text: str, heading: re.Pattern = _CHAPTER) -> tuple[int, int]:
    """Character offsets (val_start, test_start), both at chapter headings nearest to 90% and
    95% of the novel, with at least one chapter in each of val and test."""
    starts = chapter_starts(text, heading)
    if len(starts) < 3:
        raise ValueError(f"found {len(starts)} chapter headings; need at least 3 to split")
    train_frac, val_frac, _ = AUSTEN_FRACTIONS

    def nearest(frac: float) -> int:
        return min(range(len(starts)), key=lambda i: abs(starts[i] - frac * len(text)))

    i_val = min(max(nearest(train_frac), 1), len(starts) - 2)
    i_test = min(max(nearest(train_frac + val_frac), i_val + 1), len(starts) - 1)
    return starts[i_val], starts[i_test]


def austen_novel_splits(split: str) -> dict[str, str]:
    """title -> that novel's part of the split. Each novel is cut at chapter headings into
    contiguous train (first ~90%, front matter included) / val (~5%) / test (last ~5%) ranges,
    so held-out text is prose a model trained on train has never seen."""
    _check_split(split)
    return {title: _cut(novel, split) for title, novel in austen_novels().items()}


def austen_text(split: str) -> str:
    """All six novels' part of the split, in publication order, separated by blank lines."""
    return "\n\n".join(austen_novel_splits(split).values())


def _cut(text: str, split: str, heading: re.Pattern = _CHAPTER) -> str:
    """One novel's part of the split, cut at chapter headings like Austen's (see above)."""
    _check_split(split)
    val_start, test_start = _split_bounds(text, heading)
    return {
        "train": text[:val_start],
        "val": text[val_start:test_start],
        "test": text[test_start:],
    }[split]


# Moby-Dick
#
# Herman Melville's "Moby-Dick; or, The Whale" (1851) is in the public domain (first published
# 1851, author died 1891). The copy read here is Project Gutenberg EBook #2701, shipped as the
# `mobydick` data set of the R package tokenizers (MIT-licensed code; Debian main,
# r-cran-tokenizers 0.3.0-1). Project Gutenberg's header and licence footer, which concern its
# trademark and not the public-domain work, are cut off: what is measured is Melville's text.

MOBY_DICK_R_DIR = Path("/usr/lib/R/site-library/tokenizers")  # when apt-installed
_MOBY_DICK_CHAPTER = re.compile(r"^CHAPTER \d+\. ")  # "CHAPTER 1. Loomings."
_MOBY_DICK_HINT = (
    "get it with `cd /tmp && apt-get download r-cran-tokenizers && "
    "dpkg -x r-cran-tokenizers_*.deb {dest}` (or `bash scripts/setup.sh`); "
    "`apt-get install r-cran-tokenizers` also works but pulls in R"
)


def _moby_dick_data_dir() -> Path:
    return _r_package_data_dir(
        "ASTRA_MOBY_DICK_DIR", "tokenizers", MOBY_DICK_R_DIR, "Moby-Dick", _MOBY_DICK_HINT
    )


def strip_gutenberg(text: str) -> str:
    """The work itself: what lies between a Project Gutenberg file's "*** START OF" line and
    its "End of Project Gutenberg's ..." / "*** END OF" line, less a "Produced by" credit, with
    Unix line ends."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF .*$", text, re.MULTILINE)
    end = re.search(r"^(End of (the )?Project Gutenberg|\*\*\* ?END OF )", text, re.MULTILINE)
    if start is None or end is None or end.start() < start.end():
        raise ValueError("not a Project Gutenberg text: no START ... END markers")
    body = text[start.end() : end.start()].strip()
    if body.startswith("Produced by"):
        body = body.split("\n\n", 1)[1].lstrip()
    return body + "\n"


@lru_cache(maxsize=1)
def moby_dick() -> str:
    """The whole novel (front matter, 135 chapters, epilogue), 1.2 M characters. The first read
    extracts it to cache_dir()/data/moby-dick/moby-dick.txt; later reads use that."""
    cached = cache_dir() / "data" / "moby-dick" / "moby-dick.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    d = _moby_dick_data_dir()
    found = _read_rdb(d, {"mobydick"})
    if "mobydick" not in found:
        raise DataNotFoundError(f"{d}/Rdata.rdb lacks mobydick; is it tokenizers?")
    text = strip_gutenberg("\n".join(str(part) for part in found["mobydick"]))
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text(cached, text)
    return text


def moby_dick_text(split: str) -> str:
    """The novel's part of the split, cut at chapter headings: train (front matter and the
    first ~90%), val (~5%), test (the last ~5%, epilogue included)."""
    return _cut(moby_dick(), split, _MOBY_DICK_CHAPTER)


# Texts by name, and the user's own

TEXTS = {  # name -> split -> text; perplexity and embedding tasks read one (`astra eval --dataset`)
    "austen": austen_text,
    "moby-dick": moby_dick_text,
}


def builtin_text(name: str, split: str) -> str:
    """A built-in text's part of the split."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; expected one of {', '.join(TEXTS)}")
    return TEXTS[name](split)


def read_text_file(path: str | Path) -> str:
    """A user's UTF-8 plain-text file, whole (a leading byte-order mark dropped, CRLF -> LF).
    One clear error for a missing, unreadable, binary, non-UTF-8 or empty file."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataNotFoundError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{p} is a directory, not a text file") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read it ({e.strerror or e})") from None
    try:
        body = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if "\x00" in body:
        raise ValueError(f"{p} holds NUL bytes: not a plain-text file")
    body = body.removeprefix("\ufeff").replace("\r\n", "\n")
    if not body.strip():
        raise ValueError(f"{p} is empty" + (" (only whitespace)" if body else ""))
    return body


def token_blocks(tokenizer, text: str, seq_len: int, max_blocks: int | None = None):
    """Non-overlapping contiguous (B, seq_len) LongTensor of token ids from the start of text
    (no special tokens; a partial last block is dropped). Only as much text as is needed is
    tokenized, cut at a line boundary so the ids equal those of tokenizing the whole text."""
    import torch

    if seq_len < 1 or (max_blocks is not None and max_blocks < 1):
        raise ValueError(f"seq_len={seq_len} and max_blocks={max_blocks} must be >= 1")
    need = None if max_blocks is None else seq_len * max_blocks
    num_chars = len(text) if need is None else need * 8  # English BPE: ~4 chars per token
    while True:
        cut = len(text) if num_chars >= len(text) else text.rfind("\n", 0, num_chars) + 1
        chunk = text[:cut] if cut > 0 else text[:num_chars]
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        if need is None or len(ids) >= need or len(chunk) == len(text):
            break
        num_chars *= 2
    num_blocks = len(ids) // seq_len if need is None else min(len(ids) // seq_len, max_blocks)
    if num_blocks == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(ids[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


# scikit-image photos

SAMPLE_PHOTOS = (  # all shipped inside the scikit-image wheel; others would be downloaded
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "cat",
    "rocket",
    "horse",
    "coins",
    "moon",
    "page",
    "text",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)


def sample_photos() -> dict[str, np.ndarray]:
    """name -> HxWx3 uint8 image; gray and binary images are stacked to 3 channels."""
    try:
        import skimage.data
    except ImportError as e:
        raise DataNotFoundError(
            "scikit-image is not installed; `pip install scikit-image==0.26.0` "
            "(or `bash scripts/setup.sh`)"
        ) from e
    photos = {}
    for name in SAMPLE_PHOTOS:
        x = np.asarray(getattr(skimage.data, name)())
        if x.dtype == bool:
            x = x.astype(np.uint8) * 255
        if x.ndim == 2:
            x = np.stack([x] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(x[..., :3], dtype=np.uint8)
    return photos
