"""The optional C extensions, loaded once: ``kvindex._chash`` (SGLang page hashing over OpenSSL,
kvindex/_chash.c) and ``kvindex._holders`` (the index's holder table, kvindex/_holders.c).

``pip install -e .`` builds both when a C compiler (and OpenSSL's headers, for ``_chash``) is there; both
are optional in ``pyproject.toml``, so an install without a compiler succeeds and everything runs on the
pure-Python fallbacks. Then the first :func:`load` logs ONE warning line naming what is missing and why.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

__all__ = ["load"]

_EXTENSIONS = ("_chash", "_holders")
_loaded: dict[str, ModuleType | None] | None = None


def load(name: str) -> ModuleType | None:
    """The extension ``kvindex.<name>`` (one of ``_chash``, ``_holders``), or ``None`` if it is not built.

    Raises ``KeyError`` for another name.
    """
    global _loaded
    if _loaded is None:
        found: dict[str, ModuleType | None] = {}
        missing: list[str] = []
        for ext in _EXTENSIONS:
            try:
                found[ext] = importlib.import_module(f"kvindex.{ext}")
            except ImportError as exc:
                found[ext] = None
                missing.append(f"kvindex.{ext} ({exc})")
        if missing:
            logging.getLogger(__name__).warning(
                "C extensions not built: %s; page hashing (~3x) and the index (~10x at large tables) run "
                "in pure Python: reinstall with a C compiler and OpenSSL headers (libssl-dev) to build them",
                ", ".join(missing),
            )
        _loaded = found
    return _loaded[name]
