"""The one training pipeline for every algorithm (re-exports only): `train(config, workdir)`."""

from prefjax.pipeline.run import train

__all__ = ["train"]
