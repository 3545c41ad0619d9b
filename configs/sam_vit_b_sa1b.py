"""SAM ViT-B on SA-1B, the paper's recipe (appendix A): 180k steps, batch 128, lr 8e-4,
layer decay 0.6, drop path 0.6, MAE init, 64 masks per image, 11 interactive rounds.

python train.py --config configs/sam_vit_b_sa1b.py --workdir gs://BUCKET/sam_vit_b \
    --config.data.train=sa1b:/path/to/sa1b --config.init.path=/path/to/mae_pretrain_vit_base.pth
"""

from sam_jax.training.defaults import sa1b_recipe


def get_config():
    c = sa1b_recipe()
    c.model = "vit_b"
    c.model_overrides.drop_path_rate = 0.6
    c.init.path = ""  # official MAE ViT-B checkpoint (mae_pretrain_vit_base.pth)
    c.batch_size = 128
    c.total_steps = 180_000
    # The ViT-H schedule (/10 at 2/3 and 26/27 of training) stretched to 180k steps.
    c.optimizer.decay_steps = (120_000, 173_333)
    c.optimizer.layer_decay = 0.6
    return c
