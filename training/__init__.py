"""LoRA training for `cog train`, without Cog: train.py adapts it, tests drive it directly."""
