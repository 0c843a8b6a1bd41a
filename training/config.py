"""Training's settings (`cog train`, training/): the trainer's bounds and defaults, the captioners.

Inputs follow Replicate's Flux LoRA trainer; the bounds are ours. Training reads no deploy-time
environment variable of its own: the Hub's address is the weights store's (weightstore/config.py),
and wandb reads its own variables (docs/deploy.md, "Environment variables").
"""

from __future__ import annotations

# The captioning model (BLIP) that `cog train` uses for autocaption; predict never loads it.
CAPTIONER_DIR = "captioner"
# cog train's Danbooru-tag captioner for models prompted in tags (training/tagger.py): SmilingWolf's
# WD ViT tagger v3 (ONNX), with the thresholds its authors' demo uses.
TAGGER_DIR = "tagger"
TAGGER_MODELS = ("illustrious-xl",)
TAGGER_GENERAL_THRESHOLD = 0.35
TAGGER_CHARACTER_THRESHOLD = 0.85

# train.py's inputs: its literals equal these (test_cog_static.py).
TRAIN_DEFAULT_STEPS = 1000
TRAIN_MAX_STEPS = 6000
TRAIN_DEFAULT_RANK = 16  # Flux's default; on SDXL's attention a rank-16 LoRA holds a subject or style in 46 MB (fp16)
TRAIN_MAX_RANK = 128
TRAIN_DEFAULT_LEARNING_RATE = 1e-4  # the usual SDXL LoRA rate (Flux's 4e-4 is tuned for Flux)
TRAIN_MAX_LEARNING_RATE = 1.0
# The pivotal-tuning embeddings learn at their own rate, as in cog-sdxl (ti_lr).
TRAIN_EMBEDDING_LEARNING_RATE = 3e-4
TRAIN_MAX_BATCH_SIZE = 8
TRAIN_DEFAULT_RESOLUTION = "512,768,1024"  # Flux's: SDXL's size conditioning tells the scales apart
# Bucket sides (at reference scale): multiples of 64 between these, aspect ratios 1:2 to 2:1.
TRAIN_RESOLUTION_MIN = 256
TRAIN_RESOLUTION_MAX = 1536
TRAIN_BUCKET_MULTIPLE = 64
TRAIN_BUCKET_MAX_ASPECT = 2.0
TRAIN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections
TRAIN_PIVOTAL_TOKENS = 2  # new tokens per trigger word, <s0><s1>, as in cog-sdxl
TRAIN_MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting (Hang et al. 2023)
TRAIN_WARMUP_FRACTION = 0.1  # linear LR warm-up over this share of the steps, at most 100 steps
TRAIN_WARMUP_MAX_STEPS = 100
# Replicate's SDXL trainer's (cog-sdxl) lr_scheduler choices, run by diffusers' get_scheduler, and
# its input_images_filetype choices ("infer": the archive's bytes say which it is).
TRAIN_LR_SCHEDULERS = ("constant", "linear")
TRAIN_ARCHIVE_FILETYPES = ("zip", "tar", "infer")
TRAIN_LOG_SECONDS = 10.0  # one progress line at most this often (first and last step always)
TRAIN_TRIGGER_MAX_TOKENS = 4  # a trigger word the tokenizer splits into more pieces is refused
TRAIN_TRIGGER_MAX_CHARS = 64
# Pivotal tuning's safeguards (diffusers' advanced SDXL script, cog-sdxl): the new tokens learn for
# this share of the steps only, and after each step their rows are pulled this share of the way
# (in log scale) back to the vocabulary's mean row norm, so a trigger cannot outshout every word.
TRAIN_EMBEDDING_TRAIN_FRACTION = 0.5
TRAIN_EMBEDDING_NORM_PULL = 0.1
# Below this much GPU memory, gradient checkpointing is turned on even when not asked for.
TRAIN_CHECKPOINTING_BELOW_GIB = 40
# wandb sample images: steps and guidance of each (at the model's native size).
TRAIN_SAMPLE_STEPS = 28
TRAIN_SAMPLE_GUIDANCE = 5.0
# The training archive: fewer images than this cannot teach a subject; 10-20 work well.
TRAIN_MIN_IMAGES = 4
TRAIN_MAX_IMAGES = 1000
TRAIN_MAX_ARCHIVE_ENTRIES = 5000
TRAIN_MAX_ARCHIVE_BYTES = 4 * 2**30  # total uncompressed size (a zip bomb stops here)
TRAIN_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
TRAIN_CAPTION_MAX_TOKENS = 40  # autocaption length bound
