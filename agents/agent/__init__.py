"""The agent process, one per engine instance: follows the engine's SGLang streams, keeps a mirror of its
cached blocks, and republishes events, load and heartbeats to the cluster (``python -m agents.agent``).

Modules: :mod:`~agents.agent.process` (the :class:`Agent`), :mod:`~agents.agent.main` (``serve``, ``main``), :mod:`~agents.agent.frames`
(decoding, pure), :mod:`~agents.agent.kv_follower` (engine sequence tracking and gap repair),
:mod:`~agents.agent.engine_link` (HTTP discovery and health, the replay client), :mod:`~agents.agent.config`,
:mod:`~agents.agent.counters`.
"""

from agents.agent.main import main, serve
from agents.agent.process import Agent

__all__ = ["Agent", "main", "serve"]
