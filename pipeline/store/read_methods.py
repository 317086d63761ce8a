"""Read-side entry points shared by `Store` and `MultiStore`: the training loader and the tool adapters.

Both classes expose the same reading surface (manifest/hooks/n_tokens/shard_array/read_rows/shard_tokens), so
one mixin serves both; the heavy modules are imported lazily.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class ConsumersMixin:
    """loader, torch_dataset, to_hf_dataset, to_numpy, to_xarray over any store-like reader."""

    def loader(self, hooks: str | list[str], batch_size: int, shuffle: bool = True, seed: int = 0,
               **kwargs: Any) -> Iterator[Any]:
        """Shuffled batches as torch tensors (see `actstore.pipeline.store.loader.ActivationLoader`)."""
        from actstore.pipeline.store.loader import ActivationLoader

        return iter(ActivationLoader(self, hooks, batch_size, shuffle=shuffle, seed=seed, **kwargs))

    def torch_dataset(self, hooks: str | list[str], kind: str = "map", seed: int = 0, epoch: int = 0,
                      **kwargs: Any) -> Any:
        """torch Dataset: kind="map" (ActivationDataset) or "iterable" (GlobalShuffleIterable, seeded global shuffle)."""
        from actstore.pipeline.store.adapters import torch_dataset

        return torch_dataset(self, hooks, kind=kind, seed=seed, epoch=epoch, **kwargs)

    def to_hf_dataset(self, hook: str, **kwargs: Any) -> Any:
        """Hugging Face `datasets.Dataset` with an `activations` column and the token index columns."""
        from actstore.pipeline.store.adapters import to_hf_dataset

        return to_hf_dataset(self, hook, **kwargs)

    def to_numpy(self, hook: str, threads: int | None = None) -> Any:
        """The whole hook as one in-memory (n_tokens, d) numpy array, bfloat16 decoded to float32.

        Faster than `activations(hook).compute()` (no Dask graph; each byte copied once by a few threads); use
        `activations` for data larger than memory.
        """
        from actstore.pipeline.store.to_numpy import read_hook

        return read_hook(self, hook, threads)

    def to_xarray(self, hooks: list[str] | None = None) -> Any:
        """Lazy `xarray.Dataset` with dims (token, d_<hook>) and token-index coordinates."""
        from actstore.pipeline.store.adapters import to_xarray

        return to_xarray(self, hooks)
