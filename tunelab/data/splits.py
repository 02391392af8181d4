"""Train/dev/test splits of a built-in set, and the seeded ways sets without an official split are split
(stratified by label, or by whole groups: all snippets of a movie, all questions of an article). The seeds
and fractions each set uses are part of its documented benchmark."""

import random
from dataclasses import dataclass, field

SPLIT_SEED = 13


@dataclass
class Splits:
    train: list
    dev: list
    test: list
    about: dict = field(default_factory=dict)  # provenance shown in reports


def split_off(items: list, fraction: float, seed: int) -> tuple[list, list]:
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: round(len(items) * fraction)])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def stratified(examples: list, fractions, seed: int) -> tuple[list, list, list]:
    rng = random.Random(seed)
    parts = ([], [], [])
    by_label = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_train = round(len(group) * fractions[0])
        n_dev = round(len(group) * fractions[1])
        parts[0].extend(group[:n_train])
        parts[1].extend(group[n_train:n_train + n_dev])
        parts[2].extend(group[n_train + n_dev:])
    # Interleave the classes, so that the first N examples (data.max_train_examples) are a fair sample.
    for part in parts:
        rng.shuffle(part)
    return parts


def grouped(groups: dict[str, list], fractions, seed: int) -> tuple[list, list, list]:
    """Whole groups (e.g. all snippets of one movie) go to one split: groups are taken in a seeded order and
    fill train, then dev, then test, until each split holds about its fraction of the items."""
    rng = random.Random(seed)
    names = sorted(groups)
    rng.shuffle(names)
    total = sum(len(g) for g in groups.values())
    parts, taken = ([], [], []), 0
    for name in names:
        i = 0 if taken < fractions[0] * total else 1 if taken < (fractions[0] + fractions[1]) * total else 2
        parts[i].extend(groups[name])
        taken += len(groups[name])
    # Mix the groups, so that the first N examples (data.max_train_examples) are a fair sample.
    for part in parts:
        rng.shuffle(part)
    return parts


def per_label(examples: list, n: int, seed: int, gold) -> list:
    """A seeded draw of `n` examples of each label (all of a label that has fewer), in their original order:
    few-shot training sets. gold(example) -> its labels (one, for the task types this applies to)."""
    from tunelab.errors import TunelabError

    by_label = {}
    for i, e in enumerate(examples):
        labels = gold(e)
        if len(labels) != 1:
            raise TunelabError(f"data.per_label draws N examples of each label; {e.source}:{e.line} has "
                               f"{len(labels)} labels (use it with one-label tasks: classify, prompt, relation)")
        by_label.setdefault(labels[0], []).append(i)
    rng = random.Random(seed)
    keep = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], min(n, len(by_label[label]))))
    return [examples[i] for i in keep]
