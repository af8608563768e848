"""The emulated SGLang engine: a pure core (radix cache, scheduler, step-time model) and a live shell.

``python -m agents.engine.server --help`` runs one; :class:`agents.engine.core.EngineCore` is the
clock-driven core a simulator can drive directly.
"""
