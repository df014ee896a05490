"""Build the demo SAE's training and held-out corpora from text that package registries ship.

No dataset hub is reachable where the demo SAE was trained, so the text comes from packages:

* ``gensim`` (PyPI wheel, ``gensim/test/test_data``): a shortened English Wikipedia dump (211
  articles, wikitext stripped with ``mwparserfromhell``), the Lee news corpus and a small
  newsgroup sample;
* ``python3.11-doc`` (Debian): the reStructuredText sources of the Python documentation (English
  technical prose with code), to give the SAE code and programming features.

Documents are split whole, by a hash of their name, so no held-out document shares text with a
training one. Usage (the files need not be installed, only downloaded and unpacked)::

    pip download --no-deps gensim -d wheels && unzip -q wheels/gensim-*.whl -d gensim-wheel
    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc
    pip install mwparserfromhell
    python examples/demo_corpus.py gensim-wheel/gensim/test/test_data pydoc/usr/share/doc/python3.11/html/_sources out/
"""

from __future__ import annotations

import bz2
import hashlib
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from neuroscope.corpus import Corpus, save_corpus

HELD_OUT_PERCENT = 30
# The Python docs are ~3M tokens; a slice keeps them from drowning the general English text.
PYDOC_MAX_CHARS = 3_000_000


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def wikipedia(test_data: Path) -> list[tuple[str, str]]:
    import mwparserfromhell

    path = test_data / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    root = ET.fromstring(bz2.decompress(path.read_bytes()))
    ns = root.tag.split("}")[0] + "}"
    docs = []
    for page in root.iter(ns + "page"):
        title = page.findtext(ns + "title") or ""
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if ":" in title or text.lower().startswith("#redirect"):
            continue
        wikicode = mwparserfromhell.parse(text)
        # references, tables and file links are noise once stripped; drop them whole
        for tag in wikicode.filter_tags(recursive=False):
            if str(tag.tag).lower() in ("ref", "table", "gallery"):
                wikicode.remove(tag)
        plain = wikicode.strip_code(normalize=True, collapse=True)
        plain = re.sub(r"\n{3,}", "\n\n", plain)
        plain = "\n".join(
            line for line in plain.splitlines() if not line.startswith(("thumb|", "File:"))
        )
        if len(plain) > 500:
            docs.append((f"wiki:{title}", f"{title}\n\n{plain.strip()}"))
    return docs


def lines_as_docs(path: Path, prefix: str) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [
        (f"{prefix}:{i}", line.strip()) for i, line in enumerate(lines) if len(line.strip()) > 100
    ]


def newsgroup(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="latin-1")
    parts = re.split(r"\n(?=From: )", text)
    return [(f"news:{i}", part.strip()) for i, part in enumerate(parts) if len(part.strip()) > 200]


def python_docs(sources: Path) -> list[tuple[str, str]]:
    docs, total = [], 0
    for path in sorted(sources.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) < 500 or "whatsnew" in path.parts or "changelog" in path.name:
            continue
        docs.append((f"pydoc:{path.relative_to(sources)}", text))
        total += len(text)
        if total > PYDOC_MAX_CHARS:
            break
    return docs


def main(test_data: str, pydoc_sources: str, out: str) -> None:
    data = Path(test_data)
    docs = (
        wikipedia(data)
        + lines_as_docs(data / "lee_background.cor", "lee")
        + lines_as_docs(data / "lee.cor", "lee-test")
        + newsgroup(data / "mini_newsgroup")
        + python_docs(Path(pydoc_sources))
    )
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    counts: dict[str, dict[str, int]] = {"train": {}, "heldout": {}}
    for name, text in docs:
        split = "heldout" if held_out(name) else "train"
        splits[split].append(text)
        source = name.split(":")[0]
        counts[split][source] = counts[split].get(source, 0) + len(text)
    for split, texts in splits.items():
        source = {
            "kind": "packages",
            "packages": ["gensim (test data)", "python3.11-doc (Debian)"],
            "split": split,
            "characters_by_source": counts[split],
        }
        corpus = save_corpus(Corpus(texts, source), Path(out) / f"demo-{split}")
        print(split, corpus.describe(), counts[split])


if __name__ == "__main__":
    main(*sys.argv[1:4])
