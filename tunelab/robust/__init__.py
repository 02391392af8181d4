"""Robust fine-tuning: adversarial training on the input embeddings (FGM, PGD, FreeLB: perturbations of the
shared step) and R-Drop (a loss term). The components are plain objects; `step_from_config` is the one place
where the `robust:` config section becomes them (the recipes call it when they are given no `step`)."""

from tunelab.robust.adversarial import FGM, PGD, FreeLB
from tunelab.robust.rdrop import RDrop

__all__ = ["FGM", "PGD", "FreeLB", "RDrop", "step_from_config", "augmenter_from_config", "augment_ops"]


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


def augmenter_from_config(robust, examples: list, task, model=None, same_count: bool = False):
    """The per-epoch data (f(seed, epoch) -> features) the `robust.augment` section asks for: the training
    examples augmented anew every epoch (tunelab.robust.augment), encoded by `task`; None without a section.
    model: its input embeddings give the `neighbours` operation its word neighbours. same_count: every epoch
    keeps the original number of features (the multi-task recipe's streams need it)."""
    if not robust.augment:
        return None
    from tunelab.robust import augment as aug

    ops = augment_ops(robust.augment, robust.augment_intensity, examples, task, model, "config key 'robust.augment'")
    return aug.epoch_augmenter(examples, lambda xs: task.encode(xs, training=True), ops, same_count=same_count)


def augment_ops(probabilities: dict, intensity: float, examples: list, task, model=None, what: str = "augment"):
    """[(op, p, intensity)] for tunelab.robust.augment.augment: each named operation (augment.OPS) with its
    probability per example; `neighbours` gets the word neighbours of `model`'s input embeddings, `mentions`
    the mention pool of `examples`."""
    from functools import partial

    from tunelab.data.examples import Sentence, TextExample
    from tunelab.errors import TunelabError
    from tunelab.robust import augment as aug

    if not isinstance(examples[0], (Sentence, TextExample)):
        raise TunelabError(f"{what}: augmentation changes the text of NER sentences or texts to classify; a "
                           f"{task.kind} task's examples have none of its operations")
    ops = []
    for name, p in probabilities.items():
        op = aug.OPS[name]
        if name == "neighbours":
            weights = model.get_input_embeddings().weight.detach().float().cpu()
            op = partial(op, neighbours=aug.embedding_neighbours(weights, task.tokenizer))
        elif name == "mentions":
            op = partial(op, pool=aug.mention_pool([e for e in examples if isinstance(e, Sentence)]))
        ops.append((op, p, intensity))
    return ops
