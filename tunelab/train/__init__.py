"""The supervised fine-tuning recipe: `train(cfg)` reads top to bottom in tunelab/train/supervised.py."""

from tunelab.train.supervised import train

__all__ = ["train"]

