"""The emulated engine's output text: each generated token id shown as a word from a fixed list. Pure.

The engine generates no language: its token ids are pseudo-random (deterministic per request id, see
:mod:`agents.engine.core`). Decoding them byte by byte gave unreadable noise, so the HTTP layer renders
each output token as one word of :data:`WORDS` (``WORDS[token_id % len(WORDS)]``), space-separated.
The same ids always give the same text. ``output_ids``, token counts, cached tokens and timings are
unchanged; only ``text`` / ``content`` is no longer the byte decoding of ``output_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence

_WORD_LIST = """
    the of and to in is was for on are as with his they at be this from have or by one had not but
    what all were when we there can an your which their said if do will each about how up out them
    then she many some so these would other into has more her two like him see time could no make
    than first been its who now people my made over did down only way find use may water long little
    very after words called just where most know get through back much before go good new write our
    used me man too any day same right look think also around another came come work three word must
    because does part even place
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
"""128 common English words (the most frequent in written English), so ids below 128 map one to one."""


def words_text(token_ids: Sequence[int], first: bool) -> str:
    """The text of ``token_ids``, one word each, space-separated; with a leading space unless ``first``
    (the first output tokens of a response), so that pieces concatenate into one sentence."""
    text = " ".join(WORDS[t % len(WORDS)] for t in token_ids)
    return text if first or not text else " " + text
