"""The one feature cache: every network's features of every image, on disk, keyed by content, so no image is
encoded twice by one network, whichever stage asks (`fid` for its real tiles, `probe` and its pools, sweeps).

A network is keyed by its identity (the spec that shapes its features: architecture, input size, normalisation,
initialisation seed, and the sha256 of its weights file, not its path) and an image by the sha256 of its
pixels and shape. The FID extractor and the probe's encoder are the same network when `fid.extractor` is
`encoder.name` with the same weights, input size and seed: they then share one folder of the cache (with
`fid.cache` and `encoder.cache` pointing at the same root, the default), and the probe reads the vectors of
the tiles `fid` encoded instead of encoding them again.

Vectors are stored as float32 shards of (keys, vectors), each written atomically; a killed run keeps every
shard it finished.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from medi.io import atomic_path

log = logging.getLogger(__name__)


def image_keys(images: np.ndarray) -> list[str]:
    """Content keys of uint8 images (shape included): equal pixels, equal key, whatever file they came from."""
    return [hashlib.sha256(f"{im.shape}".encode() + np.ascontiguousarray(im).tobytes()).hexdigest()[:32] for im in images]


def file_digest(path: str | Path) -> str:
    """sha256 of a weights file (hashed once per process while its size and modification time stay)."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


class FeatureCache:
    """One network's vectors under `root`, in a folder named by the network and the digest of its identity."""

    def __init__(self, root: str | Path, name: str, identity: str):
        self.dir = Path(root) / f"{name.replace(':', '-').replace('/', '-')}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
        self.table: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.npz")):
            with np.load(shard) as z:
                self.table.update(zip(z["keys"].tolist(), z["vectors"]))

    def put(self, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        shard = self.dir / f"shard-{len(list(self.dir.glob('shard-*.npz'))):06d}-{keys[0][:8]}.npz"
        with atomic_path(shard) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.array(keys), vectors=vectors.astype(np.float32))
        self.table.update(zip(keys, vectors.astype(np.float32)))


def cached(images: np.ndarray, root: str, name: str, identity: str,
           encode: Callable[[list[int]], np.ndarray]) -> np.ndarray:
    """Vectors (N, D) float32 of uint8 images (N, H, W, 3) for network `name` / `identity`: from the cache under
    `root` by content, the rest (`encode(indices)` -> their vectors, in that order) encoded and added ("" = no
    cache). Logs how many came from the cache and how many were encoded.

    Under a launch this is a collective: every process gets the main process's list of missing images and calls
    `encode` with it (itself a collective that returns every vector on every process); the main process alone
    writes the cache."""
    from medi import distributed

    keys = image_keys(images)
    cache = FeatureCache(root, name, identity) if root else None
    table = cache.table if cache is not None else {}
    todo = distributed.broadcast(sorted({k: i for i, k in enumerate(keys) if k not in table}.values()))
    if todo:
        fresh, new_keys = np.asarray(encode(todo), dtype=np.float32), [keys[i] for i in todo]
        if cache is not None and distributed.is_main():
            cache.put(new_keys, fresh)
        table.update(zip(new_keys, fresh))
        distributed.barrier()                 # the cache is written before any process reads it again
    log.info("features of %d images: %d from the cache, %d encoded (%s)", len(keys), len(keys) - len(todo), len(todo),
             name)
    return np.stack([table[k] for k in keys])
