"""The `tramontane` command: main.py builds the parser; one module per command group."""

from .main import main

__all__ = ["main"]
