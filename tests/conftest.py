"""Session-wide test settings.

The emulated engine's ``/health`` is SGLang's generation probe, which never answers in under a second
(agents/engine/health.py). Tests that do not care about health timing run with the probe off, as
SGLang's own ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0`` does (``/health`` then answers at once);
child processes (engines started by ``launch cluster``) inherit it. Tests of the probe itself set
``ServerConfig(health_generation=True)`` explicitly.
"""

from __future__ import annotations

import os

from agents.engine.health import ENV_HEALTH_GENERATION

os.environ.setdefault(ENV_HEALTH_GENERATION, "0")
