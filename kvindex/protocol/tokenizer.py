"""Prompt tokenization shared by the router and the emulated engines.

The router must turn a prompt into exactly the token ids the engine will cache, or its prefix index
would not match the engine's block hashes. Two sources:

* ``--tokenizer PATH``: a Hugging Face ``tokenizer.json`` (or a model directory holding one), loaded with
  the ``tokenizers`` library; a ``tokenizer_config.json`` beside it supplies the chat template (Jinja2),
  BOS/EOS. Nothing is ever downloaded.
* no path: the **built-in tokenizer**, deterministic and dependency-free at run time: byte-level BPE with
  *no merges*, i.e. one token per UTF-8 byte, ids 0-255 in byte order (GPT-2 byte-to-unicode alphabet),
  built in code with the ``tokenizers`` library. Its chat template renders each message as
  ``<|ROLE|>\\n{content}\\n`` and ends with ``<|assistant|>\\n`` (the markers are plain text, so they
  are bytes too). The emulated engines use the same tokenizer, so the router's ids equal the engines'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

BUILTIN_NAME = "builtin-bytes"


class TokenizerError(ValueError):
    """The tokenizer could not be loaded, or an input cannot be tokenized (bad chat messages)."""


@dataclass
class Tokenizer:
    """A loaded tokenizer plus its chat template. Thread-safe for ``encode``/``decode``.

    Attributes:
        name: ``builtin-bytes`` or the path it was loaded from.
        vocab_size: number of token ids.
        eos_token_id: id the engine treats as end of sequence (None if unknown).
    """

    hf: HFTokenizer
    name: str
    vocab_size: int
    eos_token_id: int | None = None
    bos_token: str | None = None
    chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        if self.name == BUILTIN_NAME:
            # Same ids as the byte-level model below (checked in tests), without its per-call overhead.
            return list(text.encode("utf-8"))
        return list(self.hf.encode(text, add_special_tokens=False).ids)

    def encode_ids(self, text: str) -> Sequence[int]:
        """:meth:`encode` as a buffer the page hasher reads without converting each id (a ``uint32``
        numpy array for the built-in tokenizer: ~10x cheaper than its list of ints on a long prompt);
        only ``len``, indexing and the buffer protocol are promised."""
        if self.name == BUILTIN_NAME:
            return cast("Sequence[int]", np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint32))
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; invalid byte sequences decode to U+FFFD."""
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """Render OpenAI-style chat ``messages`` to the prompt text, with the generation prompt appended.

        Raises:
            TokenizerError: a message is not ``{"role": str, "content": str | list of text parts}``.
        """
        norm = [_normalise_message(m) for m in messages]
        if not norm:
            raise TokenizerError("'messages' must be a non-empty list")
        if self.chat_template is None:
            return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in norm) + "<|assistant|>\n"
        try:
            import jinja2
            import jinja2.sandbox
        except ImportError as exc:  # pragma: no cover - jinja2 is a dependency
            raise TokenizerError("a chat template needs jinja2") from exc
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tmpl = env.from_string(self.chat_template)
        return str(tmpl.render(messages=norm, add_generation_prompt=True, bos_token=self.bos_token or ""))


def _normalise_message(m: Any) -> dict[str, str]:
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
        raise TokenizerError("each message needs a string 'role'")
    content = m.get("content", "")
    if content is None:
        content = ""
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = []
        for p in content:
            if not isinstance(p, Mapping) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise TokenizerError("only text content parts are supported")
            parts.append(p["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise TokenizerError("message 'content' must be a string or a list of text parts")
    return {"role": m["role"], "content": content}


def builtin_tokenizer() -> Tokenizer:
    """The built-in byte tokenizer: one token per UTF-8 byte, id = byte value (vocab 256, no EOS)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_char)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf=hf, name=BUILTIN_NAME, vocab_size=256)


def _byte_of_char(ch: str) -> int:
    # GPT-2's byte-to-unicode map: printable Latin-1 bytes map to themselves, the rest to U+0100 + n.
    return _BYTE_OF_CHAR[ch]


def _gpt2_char_to_byte() -> dict[str, int]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF_CHAR = _gpt2_char_to_byte()


def load_tokenizer(path: str | None) -> Tokenizer:
    """Load ``path`` (a ``tokenizer.json`` or a directory holding one), or the built-in one if ``None``.

    Raises:
        TokenizerError: the path does not exist or is not a valid Hugging Face tokenizer.
    """
    if not path:
        return builtin_tokenizer()
    p = Path(path)
    tok_file = p / "tokenizer.json" if p.is_dir() else p
    if not tok_file.is_file():
        raise TokenizerError(f"no tokenizer.json at {path}")
    try:
        hf = HFTokenizer.from_file(str(tok_file))
    except Exception as exc:
        raise TokenizerError(f"cannot load {tok_file}: {exc}") from exc
    cfg: dict[str, Any] = {}
    cfg_file = tok_file.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"cannot read {cfg_file}: {exc}") from exc
    eos = _token_text(cfg.get("eos_token"))
    bos = _token_text(cfg.get("bos_token"))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return Tokenizer(
        hf=hf,
        name=str(tok_file),
        vocab_size=hf.get_vocab_size(with_added_tokens=True),
        eos_token_id=hf.token_to_id(eos) if eos else None,
        bos_token=bos,
        chat_template=template if isinstance(template, str) else None,
    )


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, Mapping) and isinstance(tok.get("content"), str):
        return str(tok["content"])
    return None
