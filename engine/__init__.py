"""The generation engine: models, sizes, schedulers, safety and metadata. It knows nothing of Cog."""
