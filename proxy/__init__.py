"""The OpenAI-compatible front door. Never imports torch."""
