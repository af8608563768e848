"""Discrete-event simulation of a routed cluster of emulated SGLang engines (``python -m launch simulate``).

``prompts`` turns trace requests into token ids and block hashes (memoised per trace block),
``router_model`` is the router (the real ``GlobalIndex`` and ``Policy``) fed with delayed KV events and
load reports, ``engine_pool`` drives one ``EngineCore`` per instance on the virtual clock, ``cluster`` is
the event loop, ``run`` the CLI and ``fidelity`` the comparison with a live cluster. See
``docs/simulator.md``.
"""
