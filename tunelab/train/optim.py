"""AdamW with the usual exemptions, and the learning-rate schedule."""

import math

import torch

from tunelab.peft import is_head


def param_groups(model, lr: float, weight_decay: float, head_lr: float | None = None, heads=frozenset(),
                 own: dict | None = None):
    """No weight decay on biases and LayerNorm weights (decaying them only hurts); the task head optionally
    at its own rate, since it starts from random weights. `own`: module name -> learning rate of a part that
    trains at its own rate and without decay (a CRF's scores)."""
    groups, own, own_groups = {}, own or {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".")[0]
        if part in own:
            own_groups.setdefault(part, {"params": [], "weight_decay": 0.0, "lr": own[part]})["params"].append(p)
            continue
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias")
        head = head_lr is not None and is_head(name, heads)
        key = (head, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": head_lr if head else lr}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)] + list(own_groups.values())


def lr_lambda(kind: str, warmup: int, total: int):
    """Linear warmup to the peak, then linear or cosine decay to 0 (or constant)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return f


def build_optimizer(model, lr, weight_decay, head_lr, scheduler, warmup_steps, total_steps, heads=frozenset(),
                    own=None):
    """`heads`: names of the new task head's modules (tunelab.peft.head_names), trained at head_lr; `own`:
    module name -> its own learning rate (param_groups)."""
    # The fused kernel does the whole update in one pass: about 3x faster than the default on CPU, where
    # the optimizer step is a fifth of a MiniLM training step.
    device = next(model.parameters()).device.type
    opt = torch.optim.AdamW(param_groups(model, lr, weight_decay, head_lr, heads, own), lr=lr, fused=device in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(scheduler, warmup_steps, total_steps))
    return opt, sched


def step(model, optimizer, scheduler, max_grad_norm: float | None) -> tuple[float | None, float]:
    """One optimizer step on the accumulated gradients: clip (when max_grad_norm is set), step, advance the
    schedule, clear the gradients. Returns the gradient norm before clipping (None unclipped) and the
    learning rate the step used."""
    grad_norm = None
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
