"""The decode server (see docs/architecture.md, "A request's way")."""
