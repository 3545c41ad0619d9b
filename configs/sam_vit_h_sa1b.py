"""SAM ViT-H on SA-1B, the paper's recipe (appendix A): 90k steps, batch 256, lr 8e-4 with 250
warm-up steps and /10 at 60k and 86,666, weight decay 0.1, layer decay 0.8, drop path 0.4,
MAE ViT-H init, 64 masks per image, 11 interactive rounds. Parameters and optimizer state are
FSDP-sharded over 8 devices by default (mesh (-1, 8)).

python train.py --config configs/sam_vit_h_sa1b.py --workdir gs://BUCKET/sam_vit_h \
    --config.data.train=sa1b:/path/to/sa1b --config.init.path=/path/to/mae_pretrain_vit_huge.pth
"""

from sam_jax.training.defaults import sa1b_recipe


def get_config():
    c = sa1b_recipe()
    c.model = "vit_h"
    c.model_overrides.drop_path_rate = 0.4
    c.init.path = ""  # official MAE ViT-H/14 checkpoint; the patch kernel is resized to 16x16
    c.mesh_shape = (-1, 8)
    return c
