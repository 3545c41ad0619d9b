"""SAM training: the interactive recipe, sharded over a device mesh, with orbax checkpoints.

Needs the training extras (optax, orbax-checkpoint, ml_collections; tensorflow for TensorBoard
events), so the inference path never imports this package. Modules:

    defaults          the experiment ConfigDict every file in configs/ starts from (all fields)
    losses            focal / dice / IoU-MSE and SAM's minimum-loss rule
    prompt_sampling   first prompt (point or noisy box) and error-region correction clicks
    train_step        encoder once per image (with LoRA adapters, or skipped for cached
                      embeddings), the simulated rounds under lax.scan, the update
    optimizer         AdamW, warm-up + step/cosine decay, layer-wise lr decay, frozen parts
    train_state       TrainState (step, params, opt_state, rng, LoRA adapters)
    embedding_cache   each training image's embedding computed once for a frozen encoder
    sharding          (data, fsdp) mesh, parameter / optimizer-state / batch sharding rules
    initialization    SamConfig and initial params: random, a SAM checkpoint or MAE
    metric_writer     metric logging: metrics.jsonl, TensorBoard events, MFU
    validation        periodic point-prompt mIoU on held-out images (sam_jax.evaluation)
    visualize         the predictions picture written at the end of training
    train_loop        train_and_evaluate(config, workdir): what train.py runs

Train checkpoints (orbax CheckpointManager, keep-last-N, data position) live with the other
checkpoint formats in sam_jax.checkpoints.training.
"""
