"""``python -m launch cluster`` as a real subprocess, for the tests that need the whole launcher.

:func:`launched_cluster` starts it with the given flags, reads its table until the ``router: URL`` line
(the launcher prints it once every process is ready), yields the process and the lines it printed, and
stops it with SIGINT (Ctrl-C) at the end: a launcher that has not exited 30 s later is killed and the
test fails, since a clean stop is part of what is tested.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def log_tails(logs: Path, chars: int = 2000) -> str:
    """The last ``chars`` characters of every process log under ``logs``, one section each."""
    return "\n".join(f"--- {f.name}\n{f.read_text()[-chars:]}" for f in sorted(logs.glob("*.log")))


@contextlib.contextmanager
def launched_cluster(
    args: Sequence[str], logs: Path, *, timeout: float = 90.0, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Run ``python -m launch cluster ARGS`` (``ARGS`` should hold ``--log-dir logs``) until it is ready.

    Fails the test (with the printed lines and every log's tail) if the launcher exits first or is not
    ready within ``timeout`` seconds (checked between lines).
    """
    cmd = [sys.executable, "-m", "launch", "cluster", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("launch cluster exited before it was ready:\n" + "".join(lines) + log_tails(logs))
            lines.append(line)
            if line.startswith("router: "):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"launch cluster not ready in {timeout:g} s:\n" + "".join(lines) + log_tails(logs)
                )
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
