"""Policy-gradient RL fine-tuning of generators (task: rl): rollouts, estimators, rewards, the recipe loop."""

from tunelab.rl.train import train

__all__ = ["train"]
