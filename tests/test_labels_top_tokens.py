"""The "top tokens" label source: built from a corpus pass's examples, ranked in the chain below
auto-interp and cached Neuronpedia labels and above ``feature_<index>``."""

from __future__ import annotations

import json

import numpy as np

from neuroscope.labels import examples as ex
from neuroscope.labels import store, top_tokens
from neuroscope.labels.sources import FALLBACK, TOP_TOKENS, LabelResolver


def test_label_counts_tokens_case_folded_and_keeps_their_first_spelling():
    examples = [(" Paris", 9.0), (" London", 8.0), (" paris", 7.5), (" Berlin", 7.0),
                ("\n", 6.0), (" London", 5.0), (" Rome", 4.0)]  # fmt: skip
    assert top_tokens.top_token_label(examples) == "Paris · London · Berlin"
    assert top_tokens.top_token_label(examples, n=1) == "Paris"
    assert top_tokens.top_token_label([("\n\n", 2.0), ("\n", 1.0)]) == "↵↵ · ↵"
    assert top_tokens.top_token_label([("", 1.0)]) == top_tokens.SPECIAL
    assert top_tokens.top_token_label([]) is None


def test_ties_in_count_go_to_the_stronger_activation():
    assert top_tokens.top_token_label([(" a", 1.0), (" b", 3.0), (" c", 2.0)]) == "b · c · a"


def _examples_folder(folder, features: dict[int, list[str]]) -> None:
    """An examples folder as the corpus pass writes it (format checked by its reader)."""
    folder.mkdir(parents=True)
    with open(folder / ex.EXAMPLES_FILE, "w", encoding="utf-8") as f:
        for index, tokens in features.items():
            rows = [
                {
                    "activation": 10.0 - j,
                    "sample": j,
                    "position": 1,
                    "before": "x",
                    "token": t,
                    "after": "y",
                }  # fmt: skip
                for j, t in enumerate(tokens)
            ]
            f.write(json.dumps({"index": index, "fires": len(rows), "examples": rows}) + "\n")
    np.save(folder / ex.FIRE_COUNT_FILE, np.zeros(8, np.int64))
    meta = {"format": ex.FORMAT, "format_version": ex.FORMAT_VERSION, "width": 8,
            "examples_per_feature": 20, "samples": 3, "model": "m", "sae": "s/sae", "layer": 1}  # fmt: skip
    (folder / ex.META_FILE).write_text(json.dumps(meta))


def test_resolver_ranks_top_tokens_between_explanations_and_the_index(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path / "cache"))
    model, sae = "some/model", "some/sae"
    _examples_folder(
        ex.examples_dir(model, sae), {1: [" one", " two", " three"], 2: [" 1999", " 2004"]}
    )
    labels_dir = store.autointerp_dir("some/labeler", model, sae)
    labels_dir.mkdir(parents=True)
    store.write_meta(labels_dir, labeler="some/labeler", model=model, sae=sae)
    with store.Journal(labels_dir / store.LABELS_FILE) as journal:
        journal.append({"index": 2, "label": "years", "status": "ok"})

    resolver = LabelResolver(model, {5: sae}, labeler="some/labeler")
    assert resolver.label(5, 1) == ("one · two · three", TOP_TOKENS)
    assert resolver.label(5, 2)[0] == "years"  # auto-interp first
    assert resolver.label(5, 3) == ("feature_3", FALLBACK)
    assert resolver.labels_for(5) == {1: "one · two · three", 2: "years"}


def test_a_file_beside_a_local_sae_is_found_and_a_broken_one_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(tmp_path / "cache"))
    sae_dir = tmp_path / "my-sae"
    sae_dir.mkdir()
    top_tokens.save(sae_dir / top_tokens.FILE, {4: "Paris · London · Berlin"})
    resolver = LabelResolver("m", {0: "an-id"}, sae_sources={0: str(sae_dir)})
    assert resolver.label(0, 4) == ("Paris · London · Berlin", TOP_TOKENS)

    (sae_dir / top_tokens.FILE).write_text("{not json")
    assert LabelResolver("m", {0: str(sae_dir)}).label(0, 4) == ("feature_4", FALLBACK)
