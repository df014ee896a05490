"""Chat templates, stop tokens, incremental decoding and stop strings."""

from __future__ import annotations

import pytest

from neuroscope.chat import ChatTokenizer, StopStrings, fold_system, normalize_messages
from neuroscope.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return ChatTokenizer(tiny_model)


def test_stop_tokens_include_eos_and_end_of_turn(tokenizer):
    vocab = tokenizer.tokenizer.get_vocab()
    assert {vocab["<eos>"], vocab["<end_of_turn>"]} <= tokenizer.stop_token_ids


def test_system_message_is_folded_for_gemma(tokenizer):
    ids = tokenizer.encode_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    text = tokenizer.tokenizer.decode(ids)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert fold_system([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]


def test_message_validation():
    with pytest.raises(ConfigError, match="non-empty"):
        normalize_messages([])
    with pytest.raises(ConfigError, match=r"messages\[1\].role"):
        normalize_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ConfigError, match="only text is supported"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert normalize_messages(
        [{"role": "developer", "content": [{"type": "text", "text": "x"}]}]
    ) == [{"role": "system", "content": "x"}]


@pytest.mark.parametrize("text", ["Hello world", "naïve café – 東京 🎉", "  spaces\n\nand lines  "])
def test_incremental_pieces_concatenate_to_the_whole(tokenizer, text):
    ids = tokenizer.encode_text(text)[1:]
    decoder = tokenizer.decoder()
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == tokenizer.tokenizer.decode(ids) == text
    if any(ord(c) > 127 for c in text):
        assert "" in pieces, "a character split across byte tokens waits for its last byte"


def test_stop_strings_hold_back_possible_prefixes():
    stops = StopStrings(["END"])
    assert stops.push("abc E") == ("abc ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("Dx") == ("", True)
    stops = StopStrings(["END"])
    assert stops.push("E") == ("", False)
    assert stops.push("gg") == ("Egg", False)
    stops.push("EN")
    assert stops.flush() == "EN"
    assert StopStrings([]).push("anything") == ("anything", False)


@pytest.mark.parametrize("skip", [True, False])
def test_streaming_decoder_equals_the_window_diff_and_keeps_special_token_rules(tokenizer, skip):
    """DecodeStream (the fast path) gives the same pieces as the old two-decodes-per-token
    window diff, and special tokens are shown or skipped as asked."""
    from neuroscope.chat import IncrementalDecoder

    class SlowOnly:  # the tokenizer without its Rust backend: the fallback path
        def __init__(self, inner):
            self.decode = inner.decode

    ids = tokenizer.encode_chat([{"role": "user", "content": "naïve café – 東京 🎉 and more"}])
    fast = tokenizer.decoder(skip_special_tokens=skip)
    slow = IncrementalDecoder(SlowOnly(tokenizer.tokenizer), skip_special_tokens=skip)
    assert fast._fast is not None and slow._fast is None
    fast_pieces = [fast.push(t) for t in ids]
    assert fast_pieces == [slow.push(t) for t in ids]
    whole = "".join(fast_pieces)
    assert whole == tokenizer.tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<start_of_turn>" in whole) is not skip
