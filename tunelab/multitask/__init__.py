"""Multi-task learning: one shared backbone, a head per task, trained on the combined task losses.

model.py: the shared-backbone model, per-task adapters, save/load/export. sampling.py: which task each batch
comes from. weighting.py: fixed, uncertainty and PCGrad combination. train.py: the recipe loop.
"""

from tunelab.multitask.train import train

__all__ = ["train"]
