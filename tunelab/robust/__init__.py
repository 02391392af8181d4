"""Robust fine-tuning: adversarial training on the input embeddings (FGM, PGD, FreeLB: perturbations of the
shared step) and R-Drop (a loss term). The components are plain objects; `step_from_config` is the one place
where the `robust:` config section becomes them (the recipes call it when they are given no `step`)."""

from tunelab.robust.adversarial import FGM, PGD, FreeLB
from tunelab.robust.rdrop import RDrop

__all__ = ["FGM", "PGD", "FreeLB", "RDrop", "step_from_config"]


def step_from_config(robust, seed: int = 0):
    """The Step a `robust:` section (tunelab.config.RobustConfig) asks for; the defaults give Step(), the plain
    task loss. seed: FreeLB's initial-noise generator (the run's train.seed)."""
    # Imported here: tunelab.train's package init imports the supervised recipe, which imports this package.
    from tunelab.train.step import Step

    terms = [RDrop(robust.rdrop)] if robust.rdrop > 0 else []
    method = robust.adversarial
    if method == "fgm":
        perturbation = FGM(robust.epsilon)
    elif method == "pgd":
        perturbation = PGD(robust.epsilon, robust.alpha, robust.steps)
    elif method == "freelb":
        perturbation = FreeLB(robust.epsilon, robust.alpha, robust.steps, seed)
    else:
        perturbation = None
    return Step(terms=terms, perturbation=perturbation)
