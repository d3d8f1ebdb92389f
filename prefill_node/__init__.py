"""The prefill server (see DESIGN.md, "A request's way")."""
