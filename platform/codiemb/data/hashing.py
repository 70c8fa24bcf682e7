"""64-bit content hashes of texts and token-id arrays (blake2b, 8 bytes, as a signed int64).

Used wherever identity of texts is checked without keeping the texts: the no-duplicates batch
sampler (per-text hashes stored beside the token shards) and hard-negative mining (corpus
documents compared with a row's positives). Two different texts share a hash with probability
~2^-64 per pair, which is far below any data error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def text_hash(text: str) -> int:
    """int64 hash of a string's UTF-8 bytes."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def text_hashes(texts: Iterable[str]) -> np.ndarray:
    return np.fromiter((text_hash(t) for t in texts), dtype=np.int64)


def ids_hashes(arrays: Iterable[np.ndarray | list[int]]) -> np.ndarray:
    """int64 hash of each token-id sequence (its int32 bytes)."""
    out = []
    for a in arrays:
        b = np.ascontiguousarray(a, dtype=np.int32).tobytes()
        out.append(int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little", signed=True))
    return np.asarray(out, dtype=np.int64)
