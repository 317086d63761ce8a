"""actstore: transformer activation datasets (Zarr v3 + Parquet) and the analyses built on them.

Heavy entry points are imported lazily so `import actstore.workers` / `actstore.schemas` never pull in Ray or
Dask (worker processes stay light).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "extract": "actstore.pipeline.extract",
    "open_store": "actstore.pipeline.store",
    "Store": "actstore.pipeline.store",
    "from_arrays": "actstore.pipeline.from_arrays",
    "ExtractConfig": "actstore.schemas.config",
    "Manifest": "actstore.schemas.manifest",
    "train_sae": "actstore.pipeline.train",
    "train_transcoder": "actstore.pipeline.train",
    "train_probe": "actstore.pipeline.probes",
    "spectrum": "actstore.pipeline.spectra",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actstore' has no attribute {name!r}")
