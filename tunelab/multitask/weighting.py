"""How the task losses (or their gradients) are combined into one update.

fixed: Σ w_i L_i with the recipe's weights.
uncertainty (Kendall, Gal & Cipolla 2018): each task has a learned s_i = log σ_i² and contributes
  ½·exp(−s_i)·L_i + ½·s_i; a noisier (higher-loss) task earns a larger σ and so a smaller weight, and the ½·s_i
  term stops σ growing without bound. (The form with ½ on both terms is the paper's regression case, as in
  LibMTL; it keeps the starting weight of every task at ½.)
pcgrad (Yu et al. 2020): the tasks' gradients on the shared parameters are computed separately; where two
  conflict (negative dot product) each loses its component along the other, then they are summed.
"""

import random

import torch


class UncertaintyWeights(torch.nn.Module):
    """One learned log-variance per task, starting at 0 (weight ½)."""

    def __init__(self, names):
        super().__init__()
        self.log_vars = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.zeros(())) for n in names})

    def forward(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        s = self.log_vars[name]
        return 0.5 * torch.exp(-s) * loss + 0.5 * s

    def weights(self) -> dict[str, float]:
        """The current multiplier of each task's loss, ½·exp(−s_i)."""
        return {n: 0.5 * float(torch.exp(-s.detach())) for n, s in self.log_vars.items()}


def pcgrad(grads: list[torch.Tensor], rng: random.Random) -> torch.Tensor:
    """Project conflicting gradients (PCGrad) and sum. grads: one flat gradient per task, all (P,).

    Task i's gradient is projected onto the normal plane of every other task's *original* gradient g_j it
    conflicts with (g_i·g_j < 0), the others visited in a random order, as in the paper's Algorithm 1."""
    out = torch.zeros_like(grads[0])
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        rng.shuffle(others)
        for j in others:
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g -= dot / torch.dot(grads[j], grads[j]).clamp_min(1e-20) * grads[j]
        out += g
    return out
