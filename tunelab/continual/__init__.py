"""Continual learning: keep a model current as new data and new tasks arrive, without forgetting what it
already does well. `train(cfg)` runs a sequence of experiences (tunelab.continual.train); the strategies
(EWC, LwF, replay) are components in tunelab.continual.strategies; the accuracy matrix's summary
(average, backward/forward transfer, forgetting) is tunelab.continual.metrics."""

from tunelab.continual.train import train

__all__ = ["train"]
