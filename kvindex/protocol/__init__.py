"""Every byte and body that crosses a process boundary (pure; see docs/architecture.md)."""
