"""Tokenizer-side work shared by every backend: chat templates, stop tokens, incremental decoding."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from neuroscope.errors import ConfigError

ROLES = ("system", "user", "assistant")
# End-of-turn markers of common chat formats; a model stops on whichever of these its vocab has.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

Message = dict[str, Any]


def message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise ConfigError(
                    "Message content parts must be {'type': 'text', 'text': str}; only text is supported."
                )
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts
    raise ConfigError("Message content must be a string or a list of text parts.")


def normalize_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Validate roles and flatten content; raise ConfigError naming the bad message."""
    if not messages:
        raise ConfigError("messages must be a non-empty list.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"messages[{i}] must be an object with 'role' and 'content'.")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ConfigError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}."
            )
        if "content" not in m or m["content"] is None:
            raise ConfigError(f"messages[{i}] has no content.")
        out.append({"role": role, "content": message_text(m["content"])})
    return out


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Merge system messages into the first user turn, for templates (Gemma's) with no system role."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


class ChatTokenizer:
    """A Hugging Face tokenizer with what generation needs around it."""

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.bos_token_id: int | None = self.tokenizer.bos_token_id
        self.stop_token_ids: frozenset[int] = frozenset(self._stop_ids(Path(model_dir)))

    def _stop_ids(self, model_dir: Path) -> Iterable[int]:
        if self.tokenizer.eos_token_id is not None:
            yield self.tokenizer.eos_token_id
        gen_config = model_dir / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            yield from ([eos] if isinstance(eos, int) else eos or [])
        vocab = self.tokenizer.get_vocab()
        yield from (vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)

    def encode_text(self, text: str) -> list[int]:
        """Plain text as the model sees it (with BOS when the tokenizer adds one)."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Apply the chat template (with the generation prompt); fold system turns if it has no system role."""
        normalized = normalize_messages(messages)
        if self.tokenizer.chat_template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in normalized) + "assistant:"
            return self.encode_text(text)
        from jinja2.exceptions import TemplateError

        try:
            return self._apply_template(normalized)
        except TemplateError as e:
            if not any(m["role"] == "system" for m in normalized):
                raise ConfigError(f"The model's chat template rejected the messages: {e}") from None
        try:
            return self._apply_template(fold_system(normalized))
        except (TemplateError, ValueError) as e:  # ValueError: only system turns, nothing to fold into
            raise ConfigError(f"The model's chat template rejected the messages: {e}") from None

    def _apply_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def token_text(self, token_id: int) -> str:
        """One token on its own, special tokens shown (for ``next_token`` of stop tokens)."""
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self.tokenizer, skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation is the decoded whole.

    Decoding tokens one by one breaks multi-byte characters and leading-space rules. With a fast
    tokenizer this is ``tokenizers``' own ``DecodeStream`` (one decode of a short window per token,
    in Rust); otherwise each piece is the difference between decoding a short window with and
    without the new token. Either way a piece that ends in an incomplete character waits for the
    next token.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._fast = getattr(tokenizer, "backend_tokenizer", None)
        if self._fast is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that gives context
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)  # type: ignore[no-any-return]

    def push(self, token_id: int) -> str:
        if self._fast is not None:
            return self._stream.step(self._fast, token_id) or ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""


class StopStrings:
    """Holds back text that might begin a stop string; reports the text to emit and whether to stop."""

    def __init__(self, stop: Sequence[str]):
        self._stop = [s for s in stop if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stop:
            return text, False
        self._pending += text
        hits = [(self._pending.find(s), s) for s in self._stop if s in self._pending]
        if hits:
            cut = min(i for i, _ in hits)
            out, self._pending = self._pending[:cut], ""
            return out, True
        keep = max(
            (k for s in self._stop for k in range(1, len(s)) if self._pending.endswith(s[:k])),
            default=0,
        )
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
