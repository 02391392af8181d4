"""Policy-gradient estimators as plain tensor functions: sequence rewards -> advantages -> a loss whose
gradient is the estimator's. No model, no config: the RL recipe (tunelab/rl/train.py) wires them.

Shapes: N sampled completions of T tokens at most; `logp`, `old_logp`, `ref_logp`, `mask` are (N, T) with
mask 1 on a completion's tokens (its end-of-text included) and 0 on padding after it. Rows come grouped by
prompt: rows i*k .. i*k+k-1 are the k samples of prompt i.

Every loss is normalised the same way, by the number of rows and the fixed T (max_new_tokens), never by a
completion's own length: the gradient is then the sequence-level policy gradient E[A * grad log p(y)] scaled by
a constant, with no bias towards short or long outputs, and the estimators are comparable at one learning rate.
"""

import torch

from tunelab.config import ESTIMATORS  # one list, also rl.estimator's choices (config loads without torch)


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per completion: sum over its tokens of log pi - log ref, the sampled estimate of KL(pi || ref) (its
    expectation over y ~ pi is the KL of the sequence distributions)."""
    return ((logp - ref_logp) * mask).sum(-1)


def shaped_rewards(task_rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The reward the policy maximises: task reward minus the KL penalty (Ziegler et al., 2019)."""
    return task_rewards - kl_coef * kl


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit standard deviation over the batch (the learning rate then means the same thing
    whatever the reward's scale)."""
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def advantages(rewards: torch.Tensor, estimator: str, k: int, baseline: float | None = None,
               greedy_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Reward minus the estimator's baseline, per completion.

    reinforce: `baseline` (a moving average of past batches' mean reward, kept by the caller; None = 0).
    rloo and ppo: leave-one-out, the mean reward of the prompt's other k-1 samples (Kool et al., 2019); with
    k = 1 ppo falls back to `baseline`. self_critical: the reward of the prompt's greedy output,
    `greedy_rewards` with one entry per prompt (Rennie et al., 2017).
    """
    if estimator == "reinforce" or (estimator == "ppo" and k == 1):
        return rewards - (0.0 if baseline is None else baseline)
    if estimator in ("rloo", "ppo"):
        if k < 2:
            raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
        groups = rewards.view(-1, k)
        others = (groups.sum(1, keepdim=True) - groups) / (k - 1)
        return (groups - others).reshape(-1)
    if estimator == "self_critical":
        if greedy_rewards is None:
            raise ValueError("self_critical needs the greedy outputs' rewards")
        return rewards - greedy_rewards.repeat_interleave(k)
    raise ValueError(f"unknown estimator {estimator!r}; one of {', '.join(ESTIMATORS)}")


def policy_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, max_tokens: int,
                old_logp: torch.Tensor | None = None, clip: float | None = None) -> torch.Tensor:
    """-(1 / (N * max_tokens)) * sum_i sum_t A_i * log pi(y_it)   (REINFORCE family), or with `old_logp` and
    `clip` the clipped-ratio surrogate of PPO (Schulman et al., 2017) with a sequence advantage on every token:
    -(1 / (N * max_tokens)) * sum_i sum_t min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i), r = pi / pi_old.
    Where r = 1 (the first pass over a rollout) both have the same gradient."""
    a = adv.detach().unsqueeze(-1)
    if old_logp is None:
        per_token = -a * logp
    else:
        ratio = torch.exp(logp - old_logp.detach())
        per_token = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    return (per_token * mask).sum() / (mask.shape[0] * max_tokens)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the policy over the completions' tokens (subtracted from the loss, times
    its coefficient, to keep sampling from collapsing early)."""
    return (entropy * mask).sum() / mask.sum().clamp(min=1)


class MovingBaseline:
    """REINFORCE's baseline: an exponential moving average of the batches' mean reward (the first batch sets
    it; the batch is scored against the average of the batches before it)."""

    def __init__(self, decay: float, value: float | None = None):
        self.decay, self.value = decay, value

    def update(self, rewards: torch.Tensor) -> None:
        mean = float(rewards.mean())
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean


def adaptive_kl(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """The adaptive KL coefficient of Ziegler et al. (2019): raised when the measured KL is above target,
    lowered below it, by at most 20 % of n_steps/horizon per update."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return coef * (1 + error * n_steps / horizon)
