"""Storage dtypes: convert captured torch tensors to the bytes we store, and stored bytes back to numbers.

bfloat16 has no Zarr/numpy dtype, so it is stored losslessly as its uint16 bit pattern with a
`actstore_dtype: bfloat16` array attribute; readers decode it to float32 exactly (bf16 is the top half of f32).
"""

from __future__ import annotations

import numpy as np
import torch

from actstore.schemas.errors import Float16OverflowError  # noqa: F401  (defined with its siblings; raised here)

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# numpy dtype of the stored bytes for each storage dtype
NUMPY_STORED = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLOAT16_MAX = 65504.0


def to_storage(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, int]:
    """Convert a tensor to the stored numpy representation; return (array, number of float16 overflows)."""
    target = TORCH_DTYPES[dtype]
    conv = t.detach().to(target)
    overflow = 0
    if dtype == "float16" and t.dtype != torch.float16 and t.numel() and _may_overflow(t):
        # An entry overflowed when it became inf in float16 but was finite before (counted only when the
        # cheap range check fires: the two full boolean tensors are the rare path).
        bad = torch.isinf(conv) & torch.isfinite(t)
        overflow = int(bad.sum())
    if dtype == "bfloat16":
        conv = conv.view(torch.int16)
    arr = conv.cpu().numpy()
    return arr.view(NUMPY_STORED[dtype]), overflow


def _may_overflow(t: torch.Tensor) -> bool:
    """One min/max reduction, no temporaries: False only when every entry is within float16's finite range.

    Written as `not (in range)` so a nan (which fails every comparison) also sends the tensor to the exact count.
    """
    lo, hi = torch.aminmax(t.detach())
    return not (bool(hi <= FLOAT16_MAX) and bool(lo >= -FLOAT16_MAX))


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bytes -> numbers: float32/float16 as they are, bfloat16 bits -> exact float32."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored


def decoded_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float32) if dtype == "bfloat16" else NUMPY_STORED[dtype].newbyteorder("=")
