"""Tests of the orbax train-state checkpointer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_jax.checkpoints import training as checkpointing
from sam_jax.training import sharding
from sam_jax.training.train_state import create_train_state


def _state(seed=0):
    params = {"a": {"kernel": jnp.arange(12.0).reshape(3, 4) + seed}, "b": jnp.ones((5,)) * seed}
    return create_train_state(params, optax.adam(1e-3), seed)


def test_save_restore_roundtrip_and_keep_last_n(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, async_save=True)
    assert ckpt.latest_step() is None
    for step in (1, 2, 3):
        state = _state(seed=step).replace(step=jnp.asarray(step, jnp.int32))
        assert ckpt.save(step, state, {"batches_consumed": step, "note": "x"})
    ckpt.wait()
    assert ckpt.manager.all_steps() == [2, 3]
    mesh = sharding.make_mesh((1, 1))
    abstract = jax.eval_shape(lambda: _state())
    target = checkpointing.abstract_with_shardings(
        abstract, sharding.tree_shardings(mesh, abstract)
    )
    restored, meta = ckpt.restore(target)
    assert meta == {"batches_consumed": 3, "note": "x"}
    want = _state(seed=3)
    assert int(restored.step) == 3
    jax.tree.map(np.testing.assert_array_equal, restored.params, want.params)
    np.testing.assert_array_equal(restored.rng, want.rng)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, want.opt_state)
    older, _ = ckpt.restore(target, step=2)
    np.testing.assert_array_equal(older.params["b"], np.full(5, 2.0))
    ckpt.close()


def test_restore_without_checkpoint_raises(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(jax.eval_shape(lambda: _state()))
    ckpt.close()
