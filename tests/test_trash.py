"""``neuroscope clean``: to the trash and back (undo), most recent first, never overwriting newer files;
``clean empty`` asks first."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from neuroscope import trash
from neuroscope.cli import app

FILES = {
    "corpus/wikitext/samples.jsonl": "corpus text",
    "corpus/examples/m/s/examples.jsonl": "examples",
    "calibration/m/s/layer_20.safetensors": "stats",
    "autointerp_labels/l/m/s/labels.jsonl": '{"index": 1}\n',
    "neuronpedia/gemma-2-2b/20/labels.jsonl": '{"index": 2}\n',
    "checkpoints/calibration-x.safetensors": "ckpt",
    "models/gguf/smollm2-0123456789ab/model.safetensors": "weights",  # a converted GGUF
    "models/dummy/gemma-2-2b/config.json": "{}",
    "labels-notes.txt": "not in any clean target: never touched",
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NEUROSCOPE_CACHE", str(root))
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in root.rglob("*")
        if p.is_file() and "trash" not in p.parts
    }


def test_clean_then_undo_restores_exactly(cache: Path) -> None:
    before = snapshot(cache)
    entry = trash.move_to_trash(["labels"])
    assert entry is not None and entry.paths == ["autointerp_labels", "neuronpedia"]
    assert not (cache / "autointerp_labels").exists() and not (cache / "neuronpedia").exists()
    assert (cache / "corpus/wikitext/samples.jsonl").exists()
    assert trash.usage()["labels"] == 0 and trash.usage()["trash"] > 0
    result = trash.undo()
    assert result.restored == 2 and result.conflicts == []
    assert snapshot(cache) == before and trash.entries() == []


def test_undo_goes_back_one_clean_at_a_time(cache: Path) -> None:
    before = snapshot(cache)
    trash.move_to_trash(["corpus"])
    trash.move_to_trash(["all"])  # the rest: checkpoints, labels, calibration, models
    assert set(snapshot(cache)) == {"labels-notes.txt"}
    assert [e.targets for e in trash.entries()] == [["all"], ["corpus"]]
    trash.undo()
    assert "corpus/wikitext/samples.jsonl" not in snapshot(cache)
    assert "calibration/m/s/layer_20.safetensors" in snapshot(cache)
    trash.undo()
    assert snapshot(cache) == before
    with pytest.raises(trash.NothingToUndo, match="empty"):
        trash.undo()


def test_undo_never_overwrites_what_was_written_since(cache: Path) -> None:
    trash.move_to_trash(["labels"])
    fresh = cache / "autointerp_labels/l/m/s/labels.jsonl"
    fresh.parent.mkdir(parents=True)
    fresh.write_text("new labels")
    result = trash.undo()
    assert result.conflicts == ["autointerp_labels/l/m/s/labels.jsonl"]
    assert fresh.read_text() == "new labels"
    assert (cache / "neuronpedia/gemma-2-2b/20/labels.jsonl").read_text() == '{"index": 2}\n'
    kept = trash.entries()[0].path / "autointerp_labels/l/m/s/labels.jsonl"
    assert kept.read_text() == '{"index": 1}\n'  # the trashed copy is still there


def test_nothing_to_clean_and_bad_targets(cache: Path) -> None:
    trash.move_to_trash(["checkpoints"])
    assert trash.move_to_trash(["checkpoints"]) is None
    with pytest.raises(Exception, match="corpus, checkpoints"):
        trash.move_to_trash(["gguf"])


def test_converted_models_are_a_clean_target_with_their_size(cache: Path) -> None:
    before = snapshot(cache)
    assert trash.usage()["models"] == len("weights") + len("{}")
    runner = CliRunner()
    assert "models" in runner.invoke(app, ["clean", "show"]).output
    result = runner.invoke(app, ["clean", "models"])
    assert result.exit_code == 0 and "Moved models" in result.output, result.output
    assert not (cache / "models").exists() and (cache / "corpus").exists()
    assert "Restored 2 files" in runner.invoke(app, ["clean", "undo"]).output
    assert snapshot(cache) == before


def test_clean_commands_round_trip(cache: Path) -> None:
    runner = CliRunner()
    before = snapshot(cache)
    result = runner.invoke(app, ["clean", "calibration"])
    assert (
        result.exit_code == 0 and "to the trash" in result.output and "clean undo" in result.output
    )
    assert "Nothing to clean" in runner.invoke(app, ["clean", "calibration"]).output
    shown = runner.invoke(app, ["clean", "show"]).output
    assert "calibration" in shown and "Trash: 1 entries" in shown
    assert "Restored 1 files" in runner.invoke(app, ["clean", "undo"]).output
    assert snapshot(cache) == before
    result = runner.invoke(app, ["clean", "undo"])
    assert (
        result.exit_code == 0 and "The trash is empty: there is nothing to undo." in result.output
    )


def test_empty_asks_first(cache: Path) -> None:
    runner = CliRunner()
    runner.invoke(app, ["clean", "corpus"])
    declined = runner.invoke(app, ["clean", "empty"], input="n\n")
    assert declined.exit_code == 1 and "for good?" in declined.output and len(trash.entries()) == 1
    accepted = runner.invoke(app, ["clean", "empty"], input="y\n")
    assert accepted.exit_code == 0 and "Deleted 1 trash entries" in accepted.output
    assert not any((cache / "trash").iterdir())
    runner.invoke(app, ["clean", "checkpoints"])
    assert runner.invoke(app, ["clean", "empty", "--yes"]).exit_code == 0 and trash.entries() == []
    assert "already empty" in runner.invoke(app, ["clean", "empty"]).output
    assert "trash is empty" in runner.invoke(app, ["clean", "undo"]).output
