"""R-Drop (Liang et al. 2021) as a loss term of the shared step (tunelab.train.step.LossTerm): a second forward
pass of the same batch, with other dropout masks, and alpha times the symmetric KL divergence between the two
passes' output distributions, so that the sub-models dropout samples agree. Dropout must be on (the recipes
train in train mode); gradients flow through both passes, as in the paper."""

import torch
import torch.nn.functional as F


def _causal(model) -> bool:
    """A decoder-only generator, whose logits at t predict the label at t + 1 (the model shifts internally)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not getattr(base.config, "is_encoder_decoder", False) and base.can_generate()


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2 per row of logits (N, C) -> (N,), in float32."""
    la, lb = F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)
    return 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))


def paired_logits(model, first: torch.Tensor, second: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (N, C) the KL compares. Sequence classification: logits (B, C), every example. Token
    classification and generation: logits (B, T, C), the positions whose label is not -100 (for decoder-only
    generators, the logits at t - 1 of label t)."""
    if first.dim() == 2 or labels is None:
        return first.reshape(-1, first.shape[-1]), second.reshape(-1, second.shape[-1])
    if _causal(model):
        first, second, labels = first[:, :-1], second[:, :-1], labels[:, 1:]
    keep = labels != -100
    return first[keep], second[keep]


class RDrop:
    """alpha * mean over compared rows of the symmetric KL between two dropout passes. Cost: one more forward
    (and its share of the backward) per micro-batch."""
    name = "rdrop"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def __call__(self, mb) -> torch.Tensor:
        second = mb.forward(**mb.batch)
        a, b = paired_logits(mb.model, mb.output.logits, second.logits, mb.batch.get("labels"))
        if a.shape[0] == 0:  # no labelled position in this micro-batch: nothing to compare
            return mb.output.logits.float().sum() * 0.0
        return self.alpha * symmetric_kl(a, b).mean()
