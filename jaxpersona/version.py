"""The package version (one place; the manifest of every run records it)."""

__version__ = "0.7.14"
