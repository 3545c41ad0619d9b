"""The train state: step, float32 params, LoRA adapters, optimizer state and the RNG key."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (optimizer steps done = batches consumed); params: float32 pytree;
    opt_state: optax state (float32) of {"params", "adapters"}; rng: uint32 (2,) raw key data
    (checkpoint friendly); adapters: float32 LoRA adapters (sam_jax.modeling.lora), {} without."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    adapters: Any = flax.struct.field(default_factory=dict)

    @property
    def trainables(self) -> dict[str, Any]:
        """What the optimizer updates (frozen leaves get zero updates)."""
        return {"params": self.params, "adapters": self.adapters}

    def key(self) -> jax.Array:
        """Typed PRNG key of this state."""
        return jax.random.wrap_key_data(self.rng)


def create_train_state(params: Any, tx: Any, seed: int, adapters: Any = None) -> TrainState:
    """Initial state (use under jax.jit with out_shardings to create it already sharded).

    tx: an optimizer over {"params", "adapters"} (sam_jax.training.optimizer.make_optimizer)."""
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    adapters = jax.tree.map(lambda x: x.astype(jnp.float32), adapters or {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init({"params": params, "adapters": adapters}),
        rng=jax.random.key_data(jax.random.key(seed)),
        adapters=adapters,
    )
