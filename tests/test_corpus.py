"""Corpus loaders on local files of each format, the stored corpus, and the `corpus` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neuroscope import corpus as corpora
from neuroscope.corpus import CorpusError

PARAGRAPHS = [
    "The capital of France is Paris, a city on the Seine known for art and food.",
    "Sparse autoencoders find features in the residual stream of language models.",
    "The quick brown fox jumps over the lazy dog, again and again, all day long.",
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(root))
    return root


@pytest.fixture
def datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    # datasets sleeps 5 s when a stream is closed early, to let pyarrow's reader threads wind down;
    # the tests' streams are tiny local files, so there is nothing to wait for.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    return datasets


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


# ---- local loaders -----------------------------------------------------------------------------------


def test_txt_gives_one_sample_per_paragraph(tmp_path) -> None:
    path = tmp_path / "a.txt"
    # a wrapped paragraph, a heading, a short line and blank lines with spaces in them
    path.write_text(
        f"{PARAGRAPHS[0][:30]}\n{PARAGRAPHS[0][30:]}\n  \n = Gameplay = \n\nshort\n\n\n{PARAGRAPHS[1]}\n"
    )
    corpus = corpora.from_local(path)
    assert corpus.texts == [f"{PARAGRAPHS[0][:30]}\n{PARAGRAPHS[0][30:]}", PARAGRAPHS[1]]
    assert corpus.source["kind"] == "local" and corpus.source["path"] == str(path.resolve())
    assert corpus.characters == sum(len(t) for t in corpus.texts)


def test_jsonl_reads_objects_and_strings(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [
        json.dumps({"id": 1, "text": PARAGRAPHS[0]}),
        "",
        json.dumps(PARAGRAPHS[1]),
        json.dumps({"id": 3, "text": None}),
        json.dumps({"id": 4, "text": PARAGRAPHS[2]}),
    ]
    path.write_text("\n".join(lines))
    assert corpora.from_local(path).texts == PARAGRAPHS


def test_jsonl_with_another_text_field(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"title": "t", "body2": p}) for p in PARAGRAPHS))
    with pytest.raises(CorpusError, match="--text-column"):
        corpora.from_local(path)
    assert corpora.from_local(path, text_column="body2").texts == PARAGRAPHS


def test_jsonl_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": PARAGRAPHS[0]}) + "\n{not json\n")
    with pytest.raises(CorpusError, match=r"a\.jsonl:2 is not valid JSON"):
        corpora.from_local(path)
    path.write_text(json.dumps({"text": 7}) + "\n")
    with pytest.raises(CorpusError, match="not text"):
        corpora.from_local(path, text_column="text")


def test_parquet_reads_the_text_column_across_row_groups(tmp_path) -> None:
    texts = [f"{p} (copy {i})" for i in range(3) for p in PARAGRAPHS]
    path = write_parquet(tmp_path / "a.parquet", {"id": list(range(len(texts))), "text": texts})
    corpus = corpora.from_local(path)
    assert corpus.texts == texts
    assert corpora.from_local(path, samples=4).texts == texts[:4]
    with pytest.raises(CorpusError, match="not text"):
        corpora.from_local(path, text_column="id")
    with pytest.raises(CorpusError, match="no column 'body'"):
        corpora.from_local(path, text_column="body")


def test_a_truncated_parquet_file_is_refused(tmp_path) -> None:
    path = write_parquet(tmp_path / "a.parquet", {"text": PARAGRAPHS})
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(CorpusError, match="not a readable Parquet"):
        corpora.from_local(path)


def test_a_folder_reads_every_format_in_path_order_and_skips_hidden_files(tmp_path) -> None:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(PARAGRAPHS[1])
    (folder / "a.jsonl").write_text(json.dumps({"text": PARAGRAPHS[0]}))
    write_parquet(folder / "sub" / "c.parquet", {"text": [PARAGRAPHS[2]]})
    (folder / ".hidden.txt").write_text(
        "A hidden file that must not be read into the corpus at all."
    )
    (folder / "notes.md").write_text(
        "A markdown file is not one of the corpus formats at all, skip it."
    )
    assert corpora.from_local(folder).texts == PARAGRAPHS


def test_samples_limit_and_min_chars(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(PARAGRAPHS))
    assert corpora.from_local(path, samples=2).texts == PARAGRAPHS[:2]
    path.write_text("tiny one\n\ntiny two")
    assert corpora.from_local(path, min_chars=5).texts == ["tiny one", "tiny two"]


def test_bad_inputs_get_clear_errors(tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\nshort\n\n = Heading = \n")
    with pytest.raises(CorpusError, match="no text samples of at least 40 characters"):
        corpora.from_local(empty)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(
        "café au lait, a drink served in France, with milk and coffee".encode("latin-1")
    )
    with pytest.raises(CorpusError, match="not UTF-8"):
        corpora.from_local(binary)
    (tmp_path / "a.csv").write_text("text\nhello")
    with pytest.raises(CorpusError, match="unknown file type '.csv'"):
        corpora.from_local(tmp_path / "a.csv")
    with pytest.raises(CorpusError, match="does not exist"):
        corpora.from_local(tmp_path / "missing.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        corpora.from_local(tmp_path / "nothing")
    with pytest.raises(CorpusError, match="at least 1"):
        corpora.from_local(tmp_path / "a.jsonl", samples=0)


# ---- datasets ------------------------------------------------------------------------------------------


def test_from_dataset_streams_a_local_parquet_dataset(tmp_path, datasets) -> None:
    texts = [f"Row {i}: {PARAGRAPHS[i % 3]}" for i in range(40)] + ["", " = Heading = "]
    write_parquet(
        tmp_path / "ds" / "data" / "train-00000-of-00001.parquet",
        {"text": texts, "n": list(range(42))},
    )
    corpus = corpora.from_dataset(str(tmp_path / "ds"), split="train", samples=10, seed=1)
    assert corpus.samples == 10 and len(set(corpus.texts)) == 10
    assert set(corpus.texts) <= set(texts[:40])
    assert corpus.texts != texts[:10]  # shuffled
    assert corpus.source["text_column"] == "text" and corpus.source["seed"] == 1
    again = corpora.from_dataset(str(tmp_path / "ds"), split="train", samples=10, seed=1)
    assert again.texts == corpus.texts  # the seed fixes the order
    with pytest.raises(CorpusError, match="Could not read dataset"):
        corpora.from_dataset(str(tmp_path / "ds"), split="validation", samples=10)


# ---- storage --------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path) -> None:
    source = tmp_path / "a.txt"
    source.write_text("\n\n".join(PARAGRAPHS))
    saved = corpora.save_corpus(corpora.from_local(source), tmp_path / "c")
    loaded = corpora.load_corpus(tmp_path / "c")
    assert loaded.texts == PARAGRAPHS and loaded.sha256 == saved.sha256
    assert loaded.source == saved.source and loaded.path == tmp_path / "c"
    manifest = json.loads((tmp_path / "c" / "corpus.json").read_text())
    assert manifest["format_version"] == corpora.FORMAT_VERSION and manifest["samples"] == 3
    assert corpora.open_corpus(tmp_path / "c", samples=2).texts == PARAGRAPHS[:2]


def test_a_changed_or_cut_corpus_is_refused(tmp_path) -> None:
    corpora.save_corpus(corpora.Corpus(PARAGRAPHS, {"kind": "local"}), tmp_path / "c")
    samples = tmp_path / "c" / "samples.jsonl"
    samples.write_bytes(samples.read_bytes()[:-10])
    with pytest.raises(CorpusError, match="does not match its manifest"):
        corpora.load_corpus(tmp_path / "c")
    with pytest.raises(CorpusError, match="not a corpus folder"):
        corpora.load_corpus(tmp_path)


def test_a_save_that_fails_leaves_no_loadable_half(tmp_path, monkeypatch) -> None:
    corpora.save_corpus(corpora.Corpus(PARAGRAPHS, {"kind": "local"}), tmp_path / "c")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corpora, "write_json_atomic", fail)
    with pytest.raises(OSError):
        corpora.save_corpus(corpora.Corpus(PARAGRAPHS[:1], {"kind": "local"}), tmp_path / "c")
    with pytest.raises(CorpusError):
        corpora.load_corpus(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["samples.jsonl"]


def test_ensure_corpus_builds_the_default_once(tmp_path, monkeypatch, cache) -> None:
    built: list[int] = []

    def from_dataset(samples: int, **kwargs) -> corpora.Corpus:
        built.append(samples)
        return corpora.Corpus([f"{p} ({i})" for i in range(samples) for p in PARAGRAPHS][:samples], {"kind": "dataset", "dataset": "wikitext", "config": "c", "split": "train"})  # fmt: skip

    monkeypatch.setattr(corpora, "from_dataset", from_dataset)
    first = corpora.ensure_corpus(None, 5)
    assert first.samples == 5 and built == [corpora.DEFAULT_SAMPLES]
    assert first.path == corpora.default_corpus_dir() and first.path.is_relative_to(cache)
    assert corpora.ensure_corpus(None, 100).samples == 100 and len(built) == 1
    assert corpora.ensure_corpus(None, 3000).samples == 3000
    assert built == [corpora.DEFAULT_SAMPLES, 3000]
    (first.path / "samples.jsonl").write_text("damaged")
    assert corpora.ensure_corpus(None, 10).samples == 10 and len(built) == 3  # rebuilt
    local = tmp_path / "a.txt"
    local.write_text("\n\n".join(PARAGRAPHS))
    assert corpora.ensure_corpus(local, 2).texts == PARAGRAPHS[:2] and len(built) == 3


# ---- the commands ---------------------------------------------------------------------------------------


def test_cli_build_from_local_files_and_show(tmp_path, cache) -> None:
    from neuroscope.cli import app

    source = tmp_path / "a.jsonl"
    source.write_text("\n".join(json.dumps({"text": p}) for p in PARAGRAPHS))
    runner = CliRunner()
    result = runner.invoke(app, ["corpus", "build", "--from", str(source), "--samples", "2"])
    assert result.exit_code == 0, result.output
    folder = cache / "corpus" / "local-a"
    assert corpora.load_corpus(folder).texts == PARAGRAPHS[:2]
    assert "samples: 2" in result.output

    shown = runner.invoke(app, ["corpus", "show", "--path", str(folder)])
    assert shown.exit_code == 0 and str(source.resolve()) in shown.output
    assert f"characters: {len(PARAGRAPHS[0]) + len(PARAGRAPHS[1])}" in shown.output

    listed = runner.invoke(app, ["corpus", "show"])
    assert listed.exit_code == 0 and str(folder) in listed.output


def test_cli_build_from_a_dataset_folder_to_an_output(tmp_path, datasets) -> None:
    from neuroscope.cli import app

    write_parquet(
        tmp_path / "ds" / "train.parquet",
        {"text": [f"{p} #{i}" for i in range(5) for p in PARAGRAPHS]},
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["corpus", "build", "--dataset", str(tmp_path / "ds"), "--samples", "7", "--output", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    corpus = corpora.load_corpus(out)
    assert corpus.samples == 7 and corpus.source["dataset"] == str(tmp_path / "ds")


def test_cli_errors_are_one_line_without_traceback(tmp_path) -> None:
    from neuroscope.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["corpus", "build", "--from", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert "Traceback" not in result.output
    empty = runner.invoke(app, ["corpus", "show"])
    assert empty.exit_code == 0 and "No corpus in the cache" in empty.output
