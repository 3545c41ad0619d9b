"""The train state: step, float32 params, optimizer state and the RNG key."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (optimizer steps done = batches consumed); params: float32 pytree;
    opt_state: optax state (float32); rng: uint32 (2,) raw key data (checkpoint friendly)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def key(self) -> jax.Array:
        """Typed PRNG key of this state."""
        return jax.random.wrap_key_data(self.rng)


def create_train_state(params: Any, tx: Any, seed: int) -> TrainState:
    """Initial state (use under jax.jit with out_shardings to create it already sharded)."""
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
