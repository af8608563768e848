"""``python -m agents.agent``: one agent (see :mod:`agents.agent.process`)."""

from agents.agent.main import main

if __name__ == "__main__":
    raise SystemExit(main())
