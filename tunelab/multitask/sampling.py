"""Which task each batch comes from, and each task's stream of batches.

Both are pure functions of (seed, step): a resumed run replays exactly the tasks and batches the interrupted
run would have seen.
"""

import random

from tunelab.data.batching import epoch_batches

from tunelab.config import SAMPLINGS  # noqa: F401 (one list, also multitask.sampling's choices (config loads without torch))


def task_probabilities(sizes: dict[str, int], kind: str, temperature: float = 2.0, progress: float = 0.0,
                       anneal_min: float = 0.2) -> dict[str, float]:
    """Probability of drawing each task's next batch. `sizes`: training sequences per task; `progress`: the
    share of training done, in [0, 1].

    proportional: p ∝ n (every example seen about equally often; small tasks are rarely drawn).
    temperature: p ∝ n^(1/T) (T=1 proportional, T→∞ uniform; Arivazhagan et al. 2019 use T=5).
    annealed: p ∝ n^α with α falling linearly from 1 to `anneal_min` over training (Stickland & Murray 2019):
      proportional first, closer to uniform at the end so the small tasks are not forgotten.
    round_robin: each task in turn, so the share is uniform.
    """
    if kind == "round_robin":
        return {name: 1 / len(sizes) for name in sizes}
    exponent = {"proportional": 1.0, "temperature": 1.0 / temperature,
                "annealed": 1.0 - (1.0 - anneal_min) * min(1.0, max(0.0, progress))}[kind]
    weights = {name: n ** exponent for name, n in sizes.items()}
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


def pick_task(names: list[str], probs: dict[str, float], kind: str, seed: int, draw: int) -> str:
    """The task of the `draw`-th batch of the run (0, 1, 2, ... across steps and accumulation)."""
    if kind == "round_robin":
        return names[draw % len(names)]
    u = random.Random(seed * 1_000_003 + draw).random()
    acc = 0.0
    for name in names:
        acc += probs[name]
        if u < acc:
            return name
    return names[-1]


class TaskStream:
    """The k-th training batch of one task: its epochs follow each other, each shuffled and length-grouped
    by `epoch_batches`, independently of how often the other tasks are drawn.

    data(seed, epoch) -> that epoch's features (the per-epoch data seam: the same encoded set every epoch by
    default, or e.g. augmented copies); every epoch must hold `size` features, since the k-th batch's epoch
    is k // batches-per-epoch."""

    def __init__(self, data, size: int, batch_size: int, seed: int, group_by_length: bool, name: str = "task",
                 pool: int = 64):
        self.data, self.size, self.batch_size, self.seed, self.group = data, size, batch_size, seed, group_by_length
        self.pool = pool  # train.length_pool
        self.name = name
        self.per_epoch = -(-size // batch_size)
        self._epoch, self._batches, self.features, self.lengths = None, None, None, None

    def batch(self, k: int) -> list[int]:
        """Indices into self.features (the features of batch k's epoch, current after this call)."""
        epoch = k // self.per_epoch
        if epoch != self._epoch:
            features = self.data(self.seed, epoch)
            if len(features) != self.size:
                raise ValueError(f"task {self.name}: epoch {epoch}'s data has {len(features)} features, not the "
                                 f"{self.size} every epoch of a multi-task stream must have")
            self._epoch, self.features = epoch, features
            self.lengths = [len(f["input_ids"]) for f in features]
            self._batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch, self.group, self.pool)
        return self._batches[k % self.per_epoch]
