"""The components of continual learning: what keeps a model from forgetting while it learns the next
experience. Each plugs into the shared training step (tunelab.train.step) or the per-experience data:

- EWC (Kirkpatrick et al., 2017; online form: Schwarz et al., 2018): a loss term (lambda/2) sum_i F_i
  (theta_i - theta*_i)^2 that holds the parameters important to earlier experiences (large diagonal Fisher
  F) near the values they had after them (theta*).
- LwF (Li & Hoiem, 2016): a loss term, the KL divergence between the frozen previous model's outputs and the
  current model's, on the current batch, for every head the previous model had (for a widened head: over
  its old labels).
- Experience replay: a bounded reservoir of past training examples (Vitter's algorithm R: each example seen
  so far is in it with equal probability), trained on beside the new data.

Parameter isolation (one adapter per experience) and the joint upper bound are ways of building the model
and the data, in the recipe (tunelab.continual.train).
"""

import random

import torch

from tunelab.data.batching import collate
from tunelab.runtime import autocast


# ---- EWC ----

def fisher_diagonal(model, forward, features: list[dict], pad: int, device, bf16: bool, samples: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher information of `model`'s trainable parameters: the mean, over up to
    `samples` training examples drawn with `seed`, of the squared gradient of each example's loss (the
    negative log-likelihood of its gold labels), one example per backward. forward(**batch) -> output with
    .loss. Dropout is off (eval mode), so the estimate is a pure function of the weights and the data."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    picked = random.Random(seed).sample(range(len(features)), min(samples, len(features)))
    was_training = model.training
    model.eval()
    used = 0
    for i in picked:
        batch = {k: v.to(device) for k, v in collate([features[i]], pad).items()}
        model.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            loss = forward(**batch).loss
        if not torch.isfinite(loss):  # an example without a labelled position
            continue
        loss.float().backward()
        used += 1
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: s / max(1, used) for n, s in sums.items() if s.any()}


def accumulate_fisher(total: dict, new: dict, decay: float) -> dict:
    """Online EWC: decay * the earlier Fisher + this experience's. A parameter that grew (a widened head's
    output layer) keeps its old rows' information; its new rows start at 0."""
    out = {}
    for n in set(total) | set(new):
        old = total.get(n)
        cur = new.get(n)
        if old is None:
            out[n] = cur.clone()
            continue
        old = old * decay
        if cur is None:
            out[n] = old
            continue
        if old.shape != cur.shape:
            old = _grow(old, cur.shape)
        out[n] = old + cur
    return out


def _grow(t: torch.Tensor, shape) -> torch.Tensor:
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


class EWC:
    """Loss term: (lambda/2) sum_i F_i (theta_i - theta*_i)^2 over the parameters with Fisher information.
    A parameter larger than its anchor (a head widened since) is compared on the anchor's rows only: the new
    rows have no earlier value to keep."""

    name = "ewc"

    def __init__(self, model, fisher: dict, anchor: dict, lam: float):
        params = dict(model.named_parameters())
        self.lam = lam
        self.parts = []
        for n, f in fisher.items():
            if n not in params:
                continue
            p = params[n]
            a = anchor[n].to(p.device)
            f = f[tuple(slice(0, s) for s in a.shape)].to(p.device)
            rows = None
            if f.dim() == 2:  # an embedding table: only the rows of tokens the Fisher sample saw carry information
                seen = f.any(1).nonzero().flatten()
                if len(seen) < 0.5 * f.shape[0]:
                    rows, f, a = seen, f[seen], a[seen]
            self.parts.append((p, a.shape[0] if rows is None else None, rows, f, a.float()))

    def __call__(self, mb=None) -> torch.Tensor:
        total = None
        for p, n_rows, rows, f, a in self.parts:
            here = p.index_select(0, rows) if rows is not None else p[:n_rows] if n_rows != p.shape[0] else p
            value = (f * (here.float() - a) ** 2).sum()
            total = value if total is None else total + value
        if total is None:
            return torch.zeros(())
        return 0.5 * self.lam * total


# ---- LwF ----

class Distill:
    """Loss term (Learning without Forgetting): for each head the previous model had, weight * T^2 *
    KL(softmax(old / T) || softmax(new / T)) on the current batch, averaged over its rows (token-level heads:
    over the batch's real tokens), summed over the heads. `heads`: head name -> (the number of labels it
    had, token_level). The previous model is frozen, in eval mode; it scores the same inputs."""

    name = "lwf"

    def __init__(self, model, previous, heads: dict, weight: float, temperature: float, device, bf16: bool):
        self.model, self.previous, self.heads = model, previous, heads
        self.weight, self.t, self.device, self.bf16 = weight, temperature, device, bf16
        previous.eval()
        for p in previous.parameters():
            p.requires_grad = False

    def __call__(self, mb) -> torch.Tensor:
        inputs = {k: v for k, v in mb.batch.items() if k != "labels"}
        mask = inputs.get("attention_mask")
        total = None
        for head, (n, token_level) in self.heads.items():
            with torch.no_grad(), autocast(self.device, self.bf16):
                old = self.previous(head, **inputs).logits
            if mb.model is self.model.heads[head]:
                new = mb.output.logits  # the current head's clean forward: no second pass
            else:
                with autocast(self.device, self.bf16):
                    new = self.model(head, **inputs).logits
            value = kl(old[..., :n].float(), new[..., :n].float(), self.t,
                       mask if token_level and mask is not None and new.dim() == 3 else None)
            total = value if total is None else total + value
        return self.weight * total


def kl(old: torch.Tensor, new: torch.Tensor, t: float, mask=None) -> torch.Tensor:
    """t^2 * KL(softmax(old/t) || softmax(new/t)), summed over the last dim, averaged over rows (or over the
    positions where mask is 1)."""
    p = torch.softmax(old / t, -1)
    per = (p * (torch.log_softmax(old / t, -1) - torch.log_softmax(new / t, -1))).sum(-1) * t * t
    if mask is None:
        return per.mean()
    m = mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp(min=1)


# ---- replay ----

class Reservoir:
    """A bounded buffer of past training examples, each seen example in it with the same probability
    size / seen (algorithm R). An entry is (experience name, example index); the k-th example ever offered
    is decided by its own seeded draw, so the buffer is a pure function of (seed, what was offered), and its
    state is plain JSON."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.seen, self.items = size, seed, 0, []

    def add(self, experience: str, n: int) -> None:
        """Offer the `n` training examples of `experience`, in order."""
        for i in range(n):
            k = self.seen
            if len(self.items) < self.size:
                self.items.append((experience, i))
            else:
                j = random.Random(self.seed * 1_000_003 + k).randrange(k + 1)
                if j < self.size:
                    self.items[j] = (experience, i)
            self.seen += 1

    def of(self, experience: str) -> list[int]:
        """The buffered example indices of one experience, in order."""
        return sorted(i for e, i in self.items if e == experience)

    def state_dict(self) -> dict:
        return {"size": self.size, "seed": self.seed, "seen": self.seen, "items": [list(x) for x in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.seed, self.seen = state["size"], state["seed"], state["seen"]
        self.items = [tuple(x) for x in state["items"]]
