"""Deterministic seed derivation.

Every random draw in the project takes an explicit generator, with one
exception: the DP noise and the Poisson sampling mask, which must be secret
(``fl.privacy.SecretNoise``; seeded only under ``--reproducible-noise``).
Generators are derived from the run seed and a label naming the purpose
(``"train"``, round, client id, ...) by hashing canonical bytes, so a
client's draws depend only on *what* it is doing, not on which process or in
which order it runs: the simulator and the network nodes get identical numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_DOMAIN = b"LLBCFL/seed/v1"


def derive_seed(seed: int, *labels: str | int) -> int:
    """A 63-bit seed from the run seed and labels (length-prefixed, so unambiguous)."""
    h = hashlib.sha256(_DOMAIN)
    for part in (seed, *labels):
        raw = str(part).encode()
        h.update(len(raw).to_bytes(4, "big") + raw)
    return int.from_bytes(h.digest()[:8], "big") & ((1 << 63) - 1)


def torch_generator(seed: int, *labels: str | int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *labels))


def numpy_generator(seed: int, *labels: str | int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *labels))
