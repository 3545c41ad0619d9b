"""Image embeddings computed once, for fine-tuning with a frozen image encoder.

With the encoder frozen (and no LoRA on it, no large-scale jitter), a training image's embedding
depends only on the image, resized and padded: it is computed once per source image into
WORKDIR/embedding_cache (through sam_jax.paths, so gs:// works), and the train step runs only the
prompt encoder, the mask decoder and the interactive rounds (`batch["embedding"]` replaces
`batch["image"]`; sam_jax.training.train_step). The pipeline has no flips, so masks and
embeddings always agree.

    embedding_cache/meta.json       the key (what the embeddings depend on) and the image count
    embedding_cache/00000042.npy    (g, g, D) float32 embedding of source image 42

The key holds a digest of the encoder's params, the architecture, the compute dtype and attention
implementation, the dataset spec, split and size, and the frame size: a changed checkpoint or
config makes a new key, and the old files are removed and rebuilt. A build that was interrupted
(or a resume) keeps the files it finished (each written whole) and computes only the rest.
Several processes share the work (image i is encoded by process i % P) and then read every file.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from sam_jax import distributed, paths
from sam_jax.data.pipeline import frame_geometry, transform_image
from sam_jax.data.sources import is_stream, open_source
from sam_jax.errors import ConfigError
from sam_jax.params import host_params
from sam_jax.training.config_checks import cache_blocker
from sam_jax.training.train_step import normalize_images

VERSION = 1
META = "meta.json"


def encoder_digest(params: Any) -> str:
    """sha256 of the image encoder's params (paths and bytes, in a fixed order)."""

    encoder = host_params(params["image_encoder"])
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(encoder), key=lambda t: str(t[0])):
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(config: Any, sam_config: Any, digest: str, num_images: int) -> dict[str, Any]:
    """What the cached embeddings depend on (compared field by field to explain a rebuild)."""
    return {
        "version": VERSION,
        "encoder_params_sha256": digest,
        "sam_config": {**sam_config.to_dict(), "drop_path_rate": 0.0},
        "dtype": config.dtype,
        "attention_impl": config.attention_impl,
        "dataset": config.data.train,
        "split": config.data.train_split,
        "num_images": int(num_images),
    }


class EmbeddingCache:
    """Reads and writes the per-image embeddings of one key under `directory`."""

    def __init__(self, directory: str, key: dict[str, Any]):
        self.directory = directory
        self.key = key

    def path(self, index: int) -> str:
        return paths.join(self.directory, f"{int(index):08d}.npy")

    def write(self, index: int, embedding: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(embedding, np.float32))
        paths.write_bytes(self.path(index), buf.getvalue())

    def read(self, index: int) -> np.ndarray:
        return np.load(io.BytesIO(paths.read_bytes(self.path(index))))

    def lookup(self, indices: np.ndarray) -> np.ndarray:
        """(R,) source indices -> (R, g, g, D) float32."""
        if np.any(np.asarray(indices) < 0):
            raise ValueError("the embedding cache needs source indices (a stream has none)")
        return np.stack([self.read(i) for i in np.asarray(indices)])

    def present(self) -> set[int]:
        if not paths.isdir(self.directory):
            return set()
        names = paths.listdir(self.directory)
        return {int(n[:-4]) for n in names if n.endswith(".npy") and n[:-4].isdigit()}

    def saved_key(self) -> dict[str, Any] | None:
        meta = paths.join(self.directory, META)
        return json.loads(paths.read_text(meta))["key"] if paths.exists(meta) else None

    def write_key(self) -> None:
        paths.makedirs(self.directory)
        paths.write_text(paths.join(self.directory, META), json.dumps({"key": self.key}, indent=1))


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))


def build(
    cache: EmbeddingCache,
    source: Any,
    encode: Callable[[np.ndarray, np.ndarray], np.ndarray],
    image_size: int,
    batch_size: int,
    say: Callable[[str], None] = print,
) -> dict[str, int]:
    """Makes the cache hold every source image's embedding; returns counts.

    encode(images uint8 (n, S, S, 3), image_hw int32 (n, 2)) -> (n, g, g, D). A different saved
    key removes the old files first. Undecodable images are skipped (counted: the pipeline skips
    them too, so they are never looked up)."""

    saved = cache.saved_key()
    main = distributed.is_main_process()
    if saved is not None and saved != cache.key:
        say(f"embedding cache: {', '.join(_changed(saved, cache.key))} changed; rebuilding")
        if main:
            paths.rmtree(cache.directory)
        distributed.barrier("embedding_cache_clear")
    if main and cache.saved_key() is None:
        cache.write_key()  # first, so files written later are known to belong to this key
    distributed.barrier("embedding_cache_key")
    done = cache.present()
    p, n_proc = jax.process_index(), jax.process_count()
    todo = [i for i in range(len(source)) if i % n_proc == p and i not in done]
    counts = {"reused": len(done), "computed": 0, "undecodable": 0}
    if todo:
        say(f"embedding cache: computing {len(todo)} of {len(source)} image embeddings")
    for start in range(0, len(todo), batch_size):
        chunk, images, hws = [], [], []
        for i in todo[start : start + batch_size]:
            record = source.load(i, None)
            if record is None:
                counts["undecodable"] += 1
                continue
            size_hw, offset = frame_geometry(*record.image.shape[:2], image_size)
            images.append(transform_image(record.image, size_hw, offset, image_size))
            hws.append(size_hw)
            chunk.append(i)
        if not chunk:
            continue
        n = len(chunk)  # pad to a fixed batch: one compiled encoder
        pad = batch_size - n
        imgs = np.stack(images + [images[0]] * pad)
        hw = np.asarray(hws + [hws[0]] * pad, np.int32)
        emb = np.asarray(encode(imgs, hw))[:n]
        for i, e in zip(chunk, emb, strict=True):
            cache.write(i, e)
        counts["computed"] += n
    distributed.barrier("embedding_cache_built")
    return counts


def frozen_encoder(model: Any, params: Any) -> Callable[[Any, Any], jax.Array]:
    """encode(images uint8 (n, S, S, 3), image_hw int32 (n, 2)) -> (n, g, g, D), jitted: what
    the train step's encoder computes on a pipeline batch (normalised, zero outside the image)."""

    @jax.jit
    def encode(p, images, image_hw):
        return model.apply({"params": p}, normalize_images(images, image_hw), method=model.encode)

    return lambda images, image_hw: encode(params, images, image_hw)


class CachedBatches:
    """The pipeline's batches with `embedding` looked up by `index` in place of `image`."""

    def __init__(self, batches: Iterator[dict], cache: EmbeddingCache):
        self.batches, self.cache = batches, cache

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        batch["embedding"] = self.cache.lookup(batch.pop("index"))
        del batch["image"]
        return batch

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


def prepare(
    config: Any, sam_config: Any, model: Any, params: Any, workdir: str, rows_per_step: int, say
) -> EmbeddingCache | None:
    """The embedding cache of this run, built or completed; None when `config.embedding_cache`
    is "off", or "auto" and the config cannot use one (the reason is printed)."""

    if config.embedding_cache == "off":
        return None
    why = cache_blocker(config)
    if why:  # "on" was refused by check_config already
        say(f"embedding cache off: {why}")
        return None
    source = open_source(
        config.data.train,
        config.data.train_split,
        jax.process_index(),
        jax.process_count(),
        index_dir=paths.join(workdir, "index"),
        barrier=lambda: distributed.barrier("data_index"),
    )
    if is_stream(source):
        why = f"{config.data.train} is a stream (no random access; build it as array_record)"
        if config.embedding_cache == "on":
            raise ConfigError(f'config field embedding_cache "on" is impossible: {why}')
        say(f"embedding cache off: {why}")
        return None
    key = cache_key(config, sam_config, encoder_digest(params), len(source))
    cache = EmbeddingCache(paths.join(workdir, "embedding_cache"), key)

    counts = build(
        cache, source, frozen_encoder(model, params), sam_config.image_size, rows_per_step, say
    )
    say(
        f"embedding cache {cache.directory}: {counts['computed']} computed, "
        f"{counts['reused']} reused, {counts['undecodable']} undecodable images skipped"
    )
    return cache
