"""The embedding cache: cached steps equal uncached ones, the encoder is not run, the cache is
reused by later runs and rebuilt when the encoder or the config changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.data import make_train_iterator
from sam_jax.data.sources import open_source
from sam_jax.modeling import build_sam
from sam_jax.training import embedding_cache, initialization, train_loop
from sam_jax.training.optimizer import make_optimizer
from sam_jax.training.train_state import create_train_state
from sam_jax.training.train_step import make_train_step
from tests.training_fakes import tiny_train_config

DATA = "synthetic:train?num_images=5&image_size=96x80"


def _config(trainable="mask_decoder"):
    c = tiny_train_config()
    c.trainable = trainable
    c.data.train = DATA
    c.model_overrides.drop_path_rate = 0.0
    return c


def _setup(config):
    sam = initialization.sam_config_from(config)
    model = build_sam(sam, config.dtype)
    params = model.init_params(jax.random.key(0))
    tx = make_optimizer(config, params, sam.encoder_depth)
    return sam, model, params, tx


def _build(tmp_path, config, sam, model, params, say=lambda s: None):
    source = open_source(config.data.train, "train")
    key = embedding_cache.cache_key(
        config, sam, embedding_cache.encoder_digest(params), len(source)
    )
    cache = embedding_cache.EmbeddingCache(str(tmp_path / "cache"), key)
    encode = embedding_cache.frozen_encoder(model, params)
    counts = embedding_cache.build(cache, source, encode, sam.image_size, config.batch_size, say)
    return cache, counts


def test_cached_step_equals_uncached_step_and_skips_the_encoder(tmp_path):
    config = _config()
    sam, model, params, tx = _setup(config)
    cache, counts = _build(tmp_path, config, sam, model, params)
    assert counts == {"reused": 0, "computed": 5, "undecodable": 0}
    batches = make_train_iterator(
        DATA,
        batch_size=2,
        image_size=sam.image_size,
        mask_size=sam.low_res_size,
        max_masks=config.data.max_masks,
        seed=0,
    )
    batch = next(batches)
    batches.close()
    assert batch["index"].dtype == np.int32 and set(batch["index"]) <= set(range(5))
    cached = next(embedding_cache.CachedBatches(iter([batch]), cache))
    assert "image" not in cached and cached["embedding"].shape == (2, *cache.read(0).shape)

    step = jax.jit(make_train_step(model, tx, config, params))
    state = create_train_state(params, tx, 0)
    s1, m1 = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    s2, m2 = step(state, {k: jnp.asarray(v) for k, v in cached.items()})
    for k in ("loss", "iou_first_round", "iou_last_round", "grad_norm"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1.params, s2.params
    )
    # With the encoder poisoned, the cached step is still finite: it does not run the encoder.
    poisoned = {
        **params,
        "image_encoder": jax.tree.map(lambda x: x * jnp.nan, params["image_encoder"]),
    }
    state = create_train_state(poisoned, tx, 0)
    _, m3 = step(state, {k: jnp.asarray(v) for k, v in cached.items()})
    _, m4 = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert np.isfinite(m3["loss"]) and not np.isfinite(m4["loss"])


def test_cache_is_reused_completed_and_rebuilt_when_its_key_changes(tmp_path):
    config = _config()
    sam, model, params, _ = _setup(config)
    cache, _ = _build(tmp_path, config, sam, model, params)
    first = cache.read(3)
    # Everything reused; an interrupted build (files missing) computes only the missing ones.
    _, counts = _build(tmp_path, config, sam, model, params)
    assert counts == {"reused": 5, "computed": 0, "undecodable": 0}
    (tmp_path / "cache" / "00000003.npy").unlink()
    _, counts = _build(tmp_path, config, sam, model, params)
    assert counts == {"reused": 4, "computed": 1, "undecodable": 0}
    np.testing.assert_array_equal(cache.read(3), first)
    # Other encoder params: the key changes, the old files go, everything is recomputed.
    other = {**params, "image_encoder": jax.tree.map(lambda x: x + 0.01, params["image_encoder"])}
    said = []
    cache2, counts = _build(tmp_path, config, sam, model, other, said.append)
    assert counts == {"reused": 0, "computed": 5, "undecodable": 0}
    assert any("encoder_params_sha256 changed; rebuilding" in s for s in said)
    assert not np.allclose(cache2.read(3), first)
    # A config change that alters the embeddings (the compute dtype) rebuilds too.
    config.dtype = "bfloat16"
    said = []
    _build(tmp_path, config, sam, model, other, said.append)
    assert any("dtype changed" in s for s in said)


@pytest.mark.slow
def test_training_uses_the_cache_and_a_resume_reuses_it(tmp_path, capsys):
    config = _config()
    config.total_steps = 2
    workdir = str(tmp_path / "run")
    train_loop.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "embedding cache" in out and "5 computed, 0 reused" in out
    files = sorted(p.name for p in (tmp_path / "run" / "embedding_cache").iterdir())
    assert files == [
        "00000000.npy",
        "00000001.npy",
        "00000002.npy",
        "00000003.npy",
        "00000004.npy",
        "meta.json",
    ]
    config.total_steps = 4
    train_loop.train_and_evaluate(config, workdir)
    assert "0 computed, 5 reused" in capsys.readouterr().out
    # A config the cache cannot serve says why and trains without it.
    full = _config(trainable="all")
    full.total_steps = 1
    train_loop.train_and_evaluate(full, str(tmp_path / "full"))
    assert (
        'embedding cache off: the image encoder trains (trainable "all")' in capsys.readouterr().out
    )
