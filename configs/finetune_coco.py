"""Fine-tune a converted SAM checkpoint on a COCO-format dataset (image encoder frozen).

python train.py --config configs/finetune_coco.py --workdir workdir/coco \
    --config.init.path=checkpoints/sam_vit_b \
    --config.data.train=coco:annotations/instances_train2017.json:train2017 \
    --config.eval.dataset=coco:annotations/instances_val2017.json:val2017

The architecture comes from the checkpoint. `trainable` picks what trains: "mask_decoder",
"prompt_encoder_and_decoder" (default) or "all" (then lower the lr; layer decay applies). With the
encoder frozen, each training image's embedding is computed once (WORKDIR/embedding_cache) and
the steps run only the prompt encoder and the decoder (`embedding_cache`, "auto").
"""

from sam_jax.training.defaults import finetune_recipe


def get_config():
    return finetune_recipe()
