"""Default experiment config (ml_collections.ConfigDict); files in configs/ start from it.

Every field can be overridden from the command line: `--config.optimizer.lr=1e-4`,
`--config.mesh_shape="(4,2)"`. Fields:

model            "vit_b" | "vit_l" | "vit_h" | "tiny" (sam_jax.config.tiny_config)
model_overrides  SamConfig fields to change (image_size, drop_path_rate, ...)
dtype            compute dtype ("bfloat16" or "float32"); params and optimizer state are float32
attention_impl   "xla" | "cudnn" | "auto" (the platform's best: a Pallas flash kernel on a TPU,
                 cuDNN on a GPU, cache-sized blocks on a CPU; chosen when the step is lowered)
remat_policy     encoder block remat: "none", "full", "dots_saveable", ... (jax.checkpoint_policies)
init.type        "random" | "sam" (converted orbax dir or official .pth) | "mae" (official MAE .pth)
init.path        checkpoint path for "sam" / "mae"
trainable        "all" | "prompt_encoder_and_decoder" | "mask_decoder" | "none" (what of the base
                 model trains; LoRA adapters train in addition; "none" needs LoRA)
lora.*           rank (0 = no LoRA), alpha (the update is scaled by alpha / rank), dropout (on
                 the adapter input), targets (a tuple of "qkv", "proj", "mlp", "decoder_attn";
                 sam_jax.modeling.lora)
embedding_cache  "auto" | "on" | "off": compute each training image's embedding once into
                 WORKDIR/embedding_cache when the encoder is frozen (no LoRA on it, no jitter);
                 "auto" uses it when possible, "on" refuses a config that cannot
data.train       training dataset spec (synthetic, sa1b:PATH, coco:ANN:IMAGES, tfds:NAME)
data.train_split split name passed to the iterator
data.max_masks   masks per image (64 in the paper)
data.large_scale_jitter  None or (min, max) scale range
batch_size       global batch (images per step, over all devices and processes)
total_steps      optimizer steps
seed             model init, prompt sampling, drop path and data order
optimizer.*      lr, b1, b2, eps, weight_decay, warmup_steps, decay ("step" | "cosine" |
                 "constant"), decay_steps, decay_factor, layer_decay, grad_clip_norm (0 = off)
train.*          num_rounds (11), box_prob, box_noise_std (fraction of side), box_noise_max (px),
                 focal_weight (20), focal_alpha (0.25; < 0: none), focal_gamma (2; 0 with
                 alpha < 0 gives binary cross-entropy), dice_weight (1), iou_weight (1),
                 supervise_all_iou,
                 max_mask_area_fraction (0.9), mask_prompt_prob (chance that a correction
                 round with a click gets the previous logits as mask prompt; 1 in the paper;
                 rounds without a click always get them),
                 unroll_rounds (lax.scan unroll of the rounds: faster steps, longer compile),
                 remat_rounds (recompute each round's decoder pass in the backward pass: memory
                 of one round instead of num_rounds, for about a third more decoder compute),
                 text_prob (chance that a mask's first prompt is the CLIP image embedding of its
                 region, SAM D.5; needs model_overrides.text_embed_dim and .text_encoder, a CLIP
                 folder or Hub id; 0 = no text prompts), text_min_area (masks under this many
                 input-frame pixels never get one; D.5's 100^2 at 1024 px)
mesh_shape       (data, fsdp); -1 takes the remaining devices
sharding_rules   ((regex, spec tuple), ...) overrides; min_fsdp_size: smaller arrays replicate
checkpoint.*     every_steps, max_to_keep, async_save
log_every_steps  metrics.jsonl / TensorBoard / progress-bar period
eval.*           dataset (spec, "" = off), split, every_steps (0 = only at the end), max_images,
                 max_masks (0 = all), num_points (mIoU after these clicks), batch_size, feed_mask
                 (previous logits as mask prompt, as eval.py --feed-mask)
peak_tflops_per_device  for the MFU estimate; 0 = look up the device kind (None if unknown)
compilation_cache_dir  persistent jax compilation cache ("" = off): reruns and resumes skip
                 compiling the train step
progress_bar     show a tqdm bar
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "vit_b"
    c.model_overrides = ml_collections.ConfigDict()
    c.dtype = "bfloat16"
    c.attention_impl = "xla"
    c.remat_policy = "full"
    c.init = ml_collections.ConfigDict({"type": "random", "path": ""})
    c.trainable = "all"
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 4.0
    c.lora.dropout = 0.0
    c.lora.targets = ("qkv",)
    c.embedding_cache = "auto"

    c.data = ml_collections.ConfigDict()
    c.data.train = "synthetic"
    c.data.train_split = "train"
    c.data.max_masks = 64
    c.data.large_scale_jitter = ml_collections.FieldReference(None, field_type=tuple)

    c.batch_size = 256
    c.total_steps = 90_000
    c.seed = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 8e-4
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_steps = 250
    c.optimizer.decay = "step"
    c.optimizer.decay_steps = (60_000, 86_666)
    c.optimizer.decay_factor = 0.1
    c.optimizer.layer_decay = 0.8
    c.optimizer.grad_clip_norm = 0.0

    c.train = ml_collections.ConfigDict()
    c.train.num_rounds = 11
    c.train.box_prob = 0.5
    c.train.box_noise_std = 0.1
    c.train.box_noise_max = 20.0
    c.train.focal_weight = 20.0
    c.train.focal_alpha = 0.25
    c.train.focal_gamma = 2.0
    c.train.dice_weight = 1.0
    c.train.iou_weight = 1.0
    c.train.supervise_all_iou = True
    c.train.max_mask_area_fraction = 0.9
    c.train.mask_prompt_prob = 1.0
    c.train.unroll_rounds = 1
    c.train.remat_rounds = True
    c.train.text_prob = 0.0
    c.train.text_min_area = 100.0 * 100.0

    c.mesh_shape = (-1, 1)
    c.sharding_rules = ()
    c.min_fsdp_size = 2**14

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    c.log_every_steps = 50
    c.eval = ml_collections.ConfigDict()
    c.eval.dataset = ""
    c.eval.split = "val"
    c.eval.every_steps = 0
    c.eval.max_images = 50
    c.eval.max_masks = 500
    c.eval.num_points = (1, 5)
    c.eval.batch_size = 64
    c.eval.feed_mask = False

    c.peak_tflops_per_device = 0.0
    c.compilation_cache_dir = ""
    c.progress_bar = True
    return c


def sa1b_recipe() -> ml_collections.ConfigDict:
    """The paper's SA-1B recipe (appendix A) shared by configs/sam_vit_{b,h}_sa1b.py: the base
    config (ViT-H schedule: batch 256, 90k steps, lr 8e-4, 250 warm-up steps, /10 at 60k and
    86,666, weight decay 0.1, layer decay 0.8, 64 masks, 11 rounds, bfloat16, remat) with MAE
    init and SA-1B data. Set init.path and the data folder on the command line."""
    c = base_config()
    c.init.type = "mae"
    c.data.train = "sa1b:"  # set the folder: --config.data.train=sa1b:PATH
    c.checkpoint.every_steps = 1000
    # The attention each platform runs best: on a TPU the Pallas flash kernel with the rel-pos
    # bias (the global blocks), on a GPU cuDNN, on a CPU the cache-sized blocks.
    c.attention_impl = "auto"
    return c


def finetune_recipe() -> ml_collections.ConfigDict:
    """Fine-tuning a SAM checkpoint on one's own data (configs/finetune_coco.py and
    finetune_lora.py): the base config with the architecture and weights from init.path, the
    image encoder frozen (its embeddings cached), AdamW with a short warm-up and cosine decay."""
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
