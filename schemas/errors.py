"""Every error actstore raises on purpose: `ActstoreError` and one subclass per kind of cause.

Each message is one line naming what is wrong and how to fix it; the CLI prints it as `actstore: error: <cause>`
and exits 2. The subclasses also derive from the builtin a caller would expect (ValueError, RuntimeError,
OSError), so `except ValueError` around older code keeps working.
"""

from __future__ import annotations


class ActstoreError(Exception):
    """Base of every error actstore raises on purpose; the message is one line with the cause and the fix."""


class ConfigError(ActstoreError, ValueError):
    """An invalid configuration or argument; the message names the field or option and the fix."""


class HookNameError(ConfigError):
    """A hook name that does not follow the grammar, or does not exist for the model or in the store."""


class CorpusError(ActstoreError, ValueError):
    """The corpus cannot be read as asked (missing, empty, undecodable, inconsistent metadata)."""


class ModelLoadError(ActstoreError, ValueError):
    """The model or its tokenizer cannot be loaded, or does not fit the requested work."""


class StoreError(ActstoreError, ValueError):
    """A store cannot be opened or read as asked; the message says what is missing or damaged."""


class ManifestError(StoreError):
    """manifest.json is missing fields, malformed, too large or from a newer format."""


class OutputError(StoreError):
    """An output location cannot be used for this run (it holds something else, or another run's files)."""


class AppendError(ActstoreError, ValueError):
    """The output or the config does not allow this append."""


class LeaseError(ActstoreError, RuntimeError):
    """Another writer holds the output."""


class StorageError(ActstoreError, OSError):
    """A storage operation failed for good (after retries): no space, permission denied, ..."""


class Float16OverflowError(ActstoreError, ValueError):
    """Activations exceed the float16 range; storing them would silently turn them into inf."""


class LabelError(ActstoreError, ValueError):
    """A span-label file or label name cannot be applied to this store (bad spans, unknown documents, ...)."""


class AnalysisError(ActstoreError, ValueError):
    """The data cannot support the requested analysis (too few rows, one class, no labelled documents, ...)."""


__all__ = [
    "ActstoreError", "AnalysisError", "AppendError", "ConfigError", "CorpusError", "Float16OverflowError",
    "HookNameError", "LabelError", "LeaseError", "ManifestError", "ModelLoadError", "OutputError", "StorageError", "StoreError",
]
