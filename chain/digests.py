"""Canonical bytes and digests of tensors, and of the claim a sender signs (pure).

The digest (:func:`weights_digest`) is SHA-256 over canonical bytes (fixed
field order, explicit dtype and shape): a tag and the tensor count, then for
each tensor in name order its name, dtype, shape and raw little-endian
bytes, each length-prefixed. The chain holds these digests (update records,
round summaries); ``node.tensors`` streams the same bytes and recomputes the
digest as they arrive. The claim a client or the server signs at the end of
a stream binds round, sender id, base digest, digest and sample count
(:func:`claim_bytes`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Final

import numpy as np
import torch

from consensus.canonical import pack_blob, pack_text, pack_u32, pack_u64
from fl.weights import Weights

DIGEST_TAG: Final = b"LLBCFL/tensors/v1\x00"

ModelSpec = Mapping[str, tuple[str, tuple[int, ...]]]
"""What a receiver expects: tensor name -> (dtype name, shape)."""

DTYPES: Final[dict[str, torch.dtype]] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: Final = {dtype: name for name, dtype in DTYPES.items()}
# Little-endian numpy dtypes: the wire byte order whatever the host's.
NUMPY_DTYPES: Final = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}


def dtype_name(tensor: torch.Tensor) -> str:
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(f"unsupported tensor dtype {tensor.dtype}")
    return name


def model_spec(weights: Weights) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The :data:`ModelSpec` of ``weights`` (e.g. a freshly built model's)."""
    return {name: (dtype_name(t), tuple(t.shape)) for name, t in weights.items()}


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * NUMPY_DTYPES[dtype].itemsize


def raw_bytes(tensor: torch.Tensor) -> bytes:
    array = tensor.detach().cpu().contiguous().numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def tensor_record(name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    dims = b"".join(pack_u64(d) for d in shape)
    return pack_text(name) + pack_text(dtype) + pack_u32(len(shape)) + dims + pack_u64(nbytes)


def canonical_digest(
    records: Iterable[tuple[str, str, tuple[int, ...], bytes | memoryview]],
) -> bytes:
    """SHA-256 over the canonical bytes of tensors given in name order."""
    items = list(records)
    hasher = hashlib.sha256(DIGEST_TAG + pack_u32(len(items)))
    for name, dtype, shape, raw in items:
        hasher.update(tensor_record(name, dtype, shape, len(raw)))
        hasher.update(raw)
    return hasher.digest()


def weights_digest(weights: Weights) -> bytes:
    """The canonical digest of ``weights``: the same for any insertion order."""
    return canonical_digest(
        (name, dtype_name(weights[name]), tuple(weights[name].shape), raw_bytes(weights[name]))
        for name in sorted(weights)
    )


def header_bytes(
    *, round: int, sender_id: str, base_digest: bytes, num_samples: int, total_bytes: int
) -> bytes:
    """Canonical bytes a sender signs in a tensor stream's header (before any data).

    A receiver checks this signature before it reserves ``total_bytes`` for
    the data; the trailer's claim (:func:`claim_bytes`) then binds the digest.
    """
    return (
        pack_u64(round)
        + pack_text(sender_id)
        + pack_blob(base_digest)
        + pack_u64(num_samples)
        + pack_u64(total_bytes)
    )


def claim_bytes(
    *, round: int, sender_id: str, base_digest: bytes, digest: bytes, num_samples: int
) -> bytes:
    """Canonical bytes of the claim a sender signs at the end of a tensor stream."""
    return (
        pack_u64(round)
        + pack_text(sender_id)
        + pack_blob(base_digest)
        + pack_blob(digest)
        + pack_u64(num_samples)
    )
