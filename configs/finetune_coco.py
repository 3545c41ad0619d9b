"""Fine-tune a converted SAM checkpoint on a COCO-format dataset (image encoder frozen).

python train.py --config configs/finetune_coco.py --workdir workdir/coco \
    --config.init.path=checkpoints/sam_vit_b \
    --config.data.train=coco:annotations/instances_train2017.json:train2017 \
    --config.eval.dataset=coco:annotations/instances_val2017.json:val2017

The architecture comes from the checkpoint. `trainable` picks what trains: "mask_decoder",
"prompt_encoder_and_decoder" (default) or "all" (then lower the lr; layer decay applies).
"""

from sam_jax.training.defaults import base_config


def get_config():
    c = base_config()
    c.init.type = "sam"
    c.init.path = ""  # a converted sam_jax checkpoint directory or an official .pth
    c.trainable = "prompt_encoder_and_decoder"
    c.data.train = "coco:"  # coco:ANN_JSON:IMAGES_DIR
    c.data.train_split = "train"
    c.data.max_masks = 32
    c.batch_size = 16
    c.total_steps = 5000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.decay = "cosine"
    c.optimizer.weight_decay = 0.01
    c.optimizer.layer_decay = 0.8
    c.optimizer.grad_clip_norm = 1.0
    c.dtype = "bfloat16"
    c.remat_policy = "none"  # no encoder backward pass when it is frozen
    c.checkpoint.every_steps = 500
    c.log_every_steps = 20
    c.eval.dataset = ""  # e.g. coco:ANN_JSON:IMAGES_DIR
    c.eval.split = "val"
    c.eval.every_steps = 1000
    c.eval.max_images = 100
    return c
