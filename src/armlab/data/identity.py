"""Document identity and seeded uniform hashes: the only inputs selection may depend on.

DESIGN.md invariant 3: whether a document is in an arm depends only on the seed, the
document's identity (its id, else a hash of its text) and its score, through a hash that is
stable across library versions. xxh3-64 is a fixed, published algorithm (xxhash >= 3); the
seeded mixing below is SplitMix64's finaliser in numpy uint64 arithmetic, so both are stable
across platforms and versions, and vectorised.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import xxhash

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def doc_keys(ids: pa.Array | pa.ChunkedArray | None, texts: pa.Array | pa.ChunkedArray | None) -> np.ndarray:
    """uint64 identity per document: xxh3-64 of the id (as UTF-8 text), else of the text.

    Integer ids are hashed through their decimal text, so `7` and `"7"` are the same document.
    Null texts get key 0 (they are dropped before selection anyway).
    """
    source = ids if ids is not None else texts
    if source is None:
        raise ValueError("doc_keys needs ids or texts")
    if isinstance(source, pa.ChunkedArray):
        source = source.combine_chunks()
    if not pa.types.is_string(source.type) and not pa.types.is_large_string(source.type):
        source = source.cast(pa.string())
    return _hash_strings(source)


def _hash_strings(arr: pa.Array) -> np.ndarray:
    """xxh3-64 of each string's UTF-8 bytes (0 for null), hashed straight from Arrow's buffers.

    Slicing the value buffer avoids building a Python str per document (the texts can be GBs).
    """
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offset_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[arr.offset : arr.offset + n + 1].tolist()
    data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
    h = xxhash.xxh3_64_intdigest
    out = np.fromiter(
        (h(data[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)), dtype=np.uint64, count=n
    )
    if arr.null_count:
        out[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return out


def text_keys(texts: list[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """xxh3-64 of each text (the identity of a document without an id)."""
    if isinstance(texts, list):
        texts = pa.array(texts, type=pa.string())
    return doc_keys(None, texts)


def mix(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Seeded 64-bit hash of each key (SplitMix64 finaliser). Same inputs, same bits, anywhere."""
    s = np.uint64(xxhash.xxh3_64_intdigest(f"armlab:{seed}:{salt}".encode()))
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) ^ s
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return z


def uniform(keys: np.ndarray, seed: int, salt: int = 0) -> np.ndarray:
    """Seeded uniform float64 in [0, 1) per key (top 53 bits of `mix`)."""
    return (mix(keys, seed, salt) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
