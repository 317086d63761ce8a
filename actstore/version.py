"""The package version, in a module of its own so results can record it without importing the whole API."""

__version__ = "0.2.0"
