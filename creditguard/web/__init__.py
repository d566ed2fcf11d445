"""The web adapters: what they share (``common``) and one module per framework."""
