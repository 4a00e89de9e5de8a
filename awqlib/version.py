"""awqlib's version (pyproject.toml gives the same number to the package metadata)."""

__version__ = "0.1.0"
