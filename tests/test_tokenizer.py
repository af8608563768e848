"""The shared tokenizer: built-in byte tokenizer, Hugging Face tokenizer.json + chat template from a directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvindex.protocol.tokenizer import BUILTIN_NAME, TokenizerError, builtin_tokenizer, load_tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def write_model_dir(d: Path, template: str | None = TEMPLATE) -> Path:
    """A model directory with the built-in tokenizer saved as tokenizer.json and a tokenizer_config.json."""
    builtin_tokenizer().hf.save(str(d / "tokenizer.json"))
    cfg: dict[str, object] = {"bos_token": "<s>", "eos_token": "A"}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld 日本\n\t", "a" * 1000, "\x00\xff"])
def test_builtin_fast_path_equals_the_byte_level_model(text: str) -> None:
    tok = builtin_tokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert ids == list(tok.hf.encode(text, add_special_tokens=False).ids)
    assert tok.decode(ids) == text


def test_builtin_chat_template() -> None:
    tok = builtin_tokenizer()
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    assert tok.apply_chat_template(msgs) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    for bad in (
        [],
        [{"content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image"}]}],
    ):
        with pytest.raises(TokenizerError):
            tok.apply_chat_template(bad)


def test_model_dir_tokenizer_and_chat_template(tmp_path: Path) -> None:
    tok = load_tokenizer(str(write_model_dir(tmp_path)))
    assert tok.name != BUILTIN_NAME and tok.vocab_size == 256
    assert tok.encode("hi") == [104, 105]
    assert tok.eos_token_id == ord("A")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[user]hi\n[assistant]"
    # a file path works too, and a model without a template falls back to the built-in rendering
    plain = load_tokenizer(str(write_model_dir(tmp_path, template=None) / "tokenizer.json"))
    assert plain.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|assistant|>\n")


def test_bad_tokenizer_paths(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(str(tmp_path))
    assert load_tokenizer(None).name == BUILTIN_NAME
