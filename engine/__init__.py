"""The generation engine: models, sizes, schedulers, safety and metadata. It knows nothing of Cog."""

from engine.logs import quiet_import_noise

quiet_import_noise()  # before any module of the engine imports diffusers' pipelines
