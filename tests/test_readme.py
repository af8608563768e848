"""The README does not promise what the CLI lacks: every ``python -m ...`` command it shows exists, and
every ``--flag`` it names is in that command's ``--help`` (pure: each ``--help`` runs in-process).

A flag is checked against the command it is written with (in a shell command, a table row or an inline
code span); a flag named on its own (``--trace``) must be in some README command's ``--help``. Flags of
other programs are listed in :data:`FOREIGN` with the program they belong to.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_OURS = {"pytest", "sglang.launch_server"}  # modules the README runs that this project does not ship
FOREIGN = {
    "--no-deps": "pip",
    "--check": "ruff format",
    "--mem-fraction-static": "SGLang's server (after `--`)",
    "--load-format": "SGLang's server (after `--`)",
    "--tp": "SGLang's server (after `--`)",
}
_CMD = re.compile(r"python -m ([a-z_][a-z0-9_.]*)(?: ([a-z][a-z-]*))?")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def segments(text: str) -> list[str]:
    """Shell commands of the code blocks (continuation lines joined, ``&&`` / ``|`` split) and the
    inline code spans and table rows of the prose."""
    out: list[str] = []
    parts = text.split("```")
    for i, part in enumerate(parts):
        if i % 2:  # a fenced code block
            joined = re.sub(r"\\\n\s*", " ", part)
            for line in joined.splitlines():
                out += re.split(r"&&|\|(?!\|)", line)
        else:
            for line in part.splitlines():
                if line.startswith("|"):
                    out.append(line)
                else:
                    out += re.findall(r"`([^`]+)`", line)
    return [" ".join(seg.split()) for seg in out if seg.strip()]


def command_flags(segment: str) -> list[tuple[str, list[str]]]:
    """``(command, flags)`` for each ``python -m`` in ``segment``; a command is the module, plus the
    subcommand for ``launch``. Flags after a bare ``--`` belong to another program and are left out."""
    found = []
    matches = list(_CMD.finditer(segment))
    for k, m in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(segment)
        rest = segment[m.end() : end].split(" -- ")[0]
        module, sub = m.group(1), m.group(2)
        command = f"{module} {sub}" if module == "launch" and sub else module
        if module != "launch" and sub:
            rest = f"{sub} {rest}"
        found.append((command, _FLAG.findall(rest)))
    return found


@cache
def help_text(command: str) -> str:
    """``python -m COMMAND --help``, run in this process (argparse prints it and exits 0)."""
    module, *sub = command.split()
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, *sub, "--help"]
    try:
        with (
            contextlib.redirect_stdout(out),
            warnings.catch_warnings(),
            pytest.raises(SystemExit) as exc,
        ):
            warnings.simplefilter("ignore", RuntimeWarning)  # re-running an imported __main__
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert exc.value.code in (0, None), f"python -m {command} --help exited with {exc.value.code}"
    return out.getvalue()


def readme_commands() -> dict[str, set[str]]:
    text = README.read_text()
    commands: dict[str, set[str]] = {}
    for seg in segments(text):
        for command, flags in command_flags(seg):
            commands.setdefault(command, set()).update(flags)
    # The "| flag | what it does |" table of the real-SGLang section lists `launch cluster` flags.
    table = text.split("| flag | what it does |", 1)[1].split("\n\n", 1)[0]
    commands["launch cluster"].update(re.findall(r"^\| `(--[a-z][a-z0-9-]*)", table, re.M))
    return {c: f for c, f in commands.items() if c.split()[0] not in NOT_OURS}


def test_segments_and_flags_are_found() -> None:
    segs = segments(
        "a `python -m launch tail --json`\n```bash\npython -m router --agent x \\\n  --port 1\n```\n"
    )
    assert segs == ["python -m launch tail --json", "bash", "python -m router --agent x --port 1"]
    assert command_flags("python -m launch cluster --gpus 0 -- --tp 2 && python -m router --agent A") == [
        ("launch cluster", ["--gpus"]),
        ("router", ["--agent"]),
    ]


def test_readme_commands_exist_and_name_only_their_own_flags() -> None:
    commands = readme_commands()
    assert {"launch cluster", "launch replay", "launch compare-live", "router", "agents.agent"} <= set(
        commands
    )
    missing = {
        c: sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}\b", help_text(c)))
        for c, flags in commands.items()
    }
    assert not {c: f for c, f in missing.items() if f}, "README flags missing from --help"


def test_every_flag_the_readme_names_exists_somewhere() -> None:
    helps = "\n".join(help_text(c) for c in readme_commands())
    named = set(_FLAG.findall(README.read_text())) - set(FOREIGN)
    unknown = sorted(f for f in named if not re.search(rf"(?<![\w-]){re.escape(f)}\b", helps))
    assert not unknown, f"README names flags no command has: {unknown}"


def test_every_launch_command_is_in_the_readme() -> None:
    top = help_text("launch")
    listed = set(re.findall(r"^    ([a-z][a-z-]+)\s", top, re.M))
    assert "compare-live" in listed
    assert {c.split()[1] for c in readme_commands() if c.startswith("launch ")} == listed
