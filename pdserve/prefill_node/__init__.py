"""The prefill server (see docs/architecture.md, "A request's way")."""
