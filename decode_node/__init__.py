"""The decode server (see DESIGN.md, "A request's way")."""
