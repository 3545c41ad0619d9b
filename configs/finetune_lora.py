"""Fine-tune a converted SAM checkpoint with LoRA on the image encoder (SAMed's recipe: rank 4 on
every attention qkv, the mask decoder fully trained), on a COCO-format dataset.

python train.py --config configs/finetune_lora.py --workdir workdir/lora \
    --config.init.path=checkpoints/sam_vit_b \
    --config.data.train=coco:annotations/instances_train2017.json:train2017

WORKDIR/model is an ordinary SAM with the adapters merged in (the predictor, AMG, eval.py, the
converter and export read it as any other). `lora.targets` = ("qkv", "proj", "mlp") gives more
capacity; `trainable` = "none" trains the adapters alone.
"""

from sam_jax.training.defaults import finetune_recipe


def get_config():
    c = finetune_recipe()
    c.trainable = "mask_decoder"  # the base decoder trains beside the encoder's adapters
    c.lora.rank = 4  # SAMed: rank 4
    c.lora.alpha = 4.0  # the update is scaled by alpha / rank = 1
    c.lora.dropout = 0.0  # dropout on each adapter's input
    c.lora.targets = ("qkv",)  # every encoder block's attention qkv projection
    c.optimizer.lr = 5e-4  # adapters start at zero: a larger lr than full fine-tuning
    c.optimizer.layer_decay = 1.0  # every adapter gets the same lr
    c.remat_policy = "full"  # the encoder's backward pass runs (for the adapters)
    return c
