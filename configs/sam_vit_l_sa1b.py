"""SAM ViT-L on SA-1B, the paper's recipe (appendix A): 180k steps, batch 128, lr 4e-4, layer
decay 0.8, drop path 0.4, MAE ViT-L init, 64 masks per image, 11 interactive rounds.

python train.py --config configs/sam_vit_l_sa1b.py --workdir gs://BUCKET/sam_vit_l \
    --config.data.train=sa1b:/path/to/sa1b --config.init.path=/path/to/mae_pretrain_vit_large.pth
"""

from sam_jax.training.defaults import sa1b_recipe


def get_config():
    c = sa1b_recipe()
    c.model = "vit_l"
    c.model_overrides.drop_path_rate = 0.4
    c.init.path = ""  # official MAE ViT-L checkpoint (mae_pretrain_vit_large.pth)
    c.batch_size = 128
    c.total_steps = 180_000
    # The ViT-H schedule (/10 at 2/3 and 26/27 of training) stretched to 180k steps.
    c.optimizer.decay_steps = (120_000, 173_333)
    c.optimizer.lr = 4e-4
    c.optimizer.layer_decay = 0.8
    return c
