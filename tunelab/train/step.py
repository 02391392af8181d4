"""The gradient of one micro-batch: the one place where the supervised and the multi-task recipes run the
forward pass, form the loss and call backward. Recipes keep their loops; what a step computes is changed
by components plugged in here, never by editing the loops:

- loss terms: callables added to the task loss before backward (e.g. EWC, distillation, R-Drop). Each
  returns a scalar tensor; the recipe logs each by its name.
- a perturbation: runs after the clean backward and adds backward passes of its own (e.g. FGM/PGD/FreeLB on
  the input embeddings), restoring whatever it changed before it returns. Its losses are weighted as the
  clean task loss is (multi-task weighting) and scaled as every loss is. One with a `watch(model)` context
  manager has it entered around the clean forward and backward (FGM takes its direction from the clean
  pass's gradient there instead of a pass of its own).

Components are plain objects built from config at the edge of a recipe (they never see a config). A
component with state (a running estimate, a buffer, its own RNG) has state_dict() / load_state_dict(),
and the recipe's checkpoints carry that state, so that a resumed run continues exactly.

Loss scaling: a micro-batch's loss is divided by the number of micro-batches in the optimizer step
(gradient accumulation) and, in a distributed run, multiplied by this process's share of the global batch
(tunelab.distributed.loss_weight), so that the gradient left in .grad is that of the global batch's mean.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from tunelab.runtime import autocast


@dataclass
class MicroBatch:
    """What loss terms and perturbations see of a micro-batch."""
    model: torch.nn.Module  # the plain model (not the DDP wrapper): embeddings, parameters, config
    batch: dict  # tensors on the device: input_ids, attention_mask, labels
    output: object  # the clean forward's model output (.loss, .logits)
    forward: Callable  # forward(**batch) -> output, under the step's precision (e.g. with inputs_embeds)


class LossTerm(Protocol):
    name: str

    def __call__(self, mb: MicroBatch) -> torch.Tensor:
        """A scalar added to the (weighted) task loss before backward."""


class Perturbation(Protocol):
    name: str

    def __call__(self, mb: MicroBatch, backward: Callable[[torch.Tensor], None]) -> dict[str, float]:
        """After the clean backward: further forward passes whose task losses go to `backward(loss)` (which
        applies the step's weighting and scaling); restores what it changed. Returns scalars to log."""


@dataclass
class Step:
    """The components that change how a step's gradient is computed (none: the plain task loss)."""
    terms: list = field(default_factory=list)
    perturbation: object = None

    def stateful(self) -> dict:
        """Components with state to checkpoint, by name."""
        parts = list(self.terms) + ([self.perturbation] if self.perturbation is not None else [])
        return {p.name: p for p in parts if hasattr(p, "state_dict")}


@dataclass
class Result:
    loss: float  # the task loss (unweighted) times this process's share
    objective: float  # what was differentiated, times share / accum
    terms: dict  # loss term name -> value (this process's, times share)
    logs: dict  # the perturbation's scalars


def micro_batch(forward: Callable, model, batch: dict, *, device, bf16: bool, step: Step | None = None,
                share: float = 1.0, accum: int = 1, weigh: Callable | None = None, weight: float = 1.0) -> Result:
    """Forward, loss, backward of one micro-batch; gradients accumulate in .grad.

    forward(**batch) -> model output (the DDP-wrapped model in a distributed run, or a multi-task model
    bound to one task). share: this process's weight on its mean loss (1 on one process; 0 when it has no
    labelled unit in this global batch and runs a stand-in row). accum: micro-batches per optimizer step.
    weight: this micro-batch's weight in the step's gradient (train.loss_weighting=tokens: its share of loss
    units); it scales what is differentiated, not the logged loss.
    weigh(loss) -> the loss to differentiate (multi-task weighting; affine in the loss, as fixed and
    uncertainty weighting are); None: the loss itself. A perturbation's losses get weigh's factor on the loss
    only, weigh(l) - weigh(0): its additive part (uncertainty weighting's ½·s) is the clean loss's alone."""
    step = step or Step()
    perturbation = step.perturbation

    def run(**inputs):
        with autocast(device, bf16):
            return forward(**inputs)

    scale = share * weight

    def backward(objective: torch.Tensor) -> None:
        ((objective * scale if scale != 1 else objective) / accum).backward()

    def weighted(loss: torch.Tensor) -> torch.Tensor:  # a perturbed pass's task loss, weighted as the clean one
        return weigh(loss.float()) - weigh(loss.new_zeros((), dtype=torch.float32)) if weigh is not None else loss

    watch = getattr(perturbation, "watch", None)
    with watch(model) if watch is not None else nullcontext():
        output = run(**batch)
        # share 0 (no labelled token on this process): a zero gradient, not the NaN of an empty mean
        loss = output.loss if share else output[1].float().sum() * 0.0  # (output[1]: logits, or QA's start logits)
        objective = weigh(loss.float()) if weigh is not None else loss
        mb = MicroBatch(model, batch, output, run)
        terms = {}
        for term in step.terms:
            value = term(mb)
            terms[term.name] = value.item() * share
            objective = objective + value
        backward(objective)
    logs = perturbation(mb, lambda loss: backward(weighted(loss))) if perturbation is not None else {}
    return Result(loss.item() * share, objective.item() * scale / accum, terms, logs)


def mean_logs(results: list[Result]) -> dict:
    """Per-step means of the loss terms and perturbation scalars of its micro-batches (empty without)."""
    out = {}
    for part, prefix in (("terms", "term"), ("logs", "perturb")):  # as the history and TensorBoard name them
        names = {n for r in results for n in getattr(r, part)}
        for n in sorted(names):
            values = [getattr(r, part)[n] for r in results if n in getattr(r, part)]
            out[f"{prefix}/{n}"] = sum(values) / len(values)
    return out
