"""routstr: a compact, auditable Routstr node (OpenAI-compatible gateway paid in Cashu ecash)."""

__version__ = "0.1.0"
