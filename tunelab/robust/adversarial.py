"""Adversarial training on the input embeddings: FGM, PGD and FreeLB as perturbations of the shared step
(tunelab.train.step.Perturbation). Each runs after the clean backward and adds the loss of the batch with a
perturbation delta added to the input-embedding output (the word-embedding lookup, before position embeddings
and normalisation: what `inputs_embeds` replaces), found by gradient ascent on the loss.

Shapes: delta is (B, T, H) for input_ids (B, T) and embedding width H. Norms are per example: the L2 norm over
that example's T x H entries with padding positions (attention_mask == 0) masked out, so every example gets a
perturbation of the same size whatever its length and the batch's padding. The perturbation is on the
activations, not on the weights: the parameters (embedding weights included, frozen or not) are never written,
only their .grad changes; the hook that adds delta is removed on the way out, exceptions included.

FGM's direction, and PGD's first ascent step, are the gradient of the step's clean objective w.r.t. the
input embeddings at delta = 0, which the clean backward computes anyway: `watch` captures it there (what the
usual FGM-for-NLP code reads from the embedding weight's .grad, but per example and without the other
batches' accumulated gradient). Where the clean pass has no such gradient (frozen embeddings under PEFT
whose output needs no grad) it takes a pass of its own. Further gradients w.r.t. delta that only choose a
direction (PGD's later ascent steps) are taken with torch.autograd.grad, so they do not accumulate into the
parameters' .grad; a distributed run cannot take those (DDP wants a backward after each forward).
"""

from contextlib import contextmanager

import torch

from tunelab.errors import TunelabError


def input_embedding(model) -> torch.nn.Module:
    """The module whose output is the input tokens' embeddings: the encoder's for encoder-decoders (T5 embeds
    encoder and decoder tokens with separate modules that share a weight), else get_input_embeddings() (it
    sees through a peft wrapper, whose base embeddings are perturbed too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "is_encoder_decoder", False) and hasattr(base, "get_encoder"):
        return base.get_encoder().get_input_embeddings()
    return model.get_input_embeddings()


class _Shift:
    """A forward hook adding `delta` to the first call of the embedding module in each armed forward pass
    (the first call is the input tokens' lookup; later calls in the same pass, if any, are left alone)."""

    def __init__(self, module):
        self.module, self.delta, self.armed = module, None, False
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if not self.armed:
            return None
        self.armed = False
        if output.shape != self.delta.shape:
            raise TunelabError(f"adversarial training: the input embedding's output has shape {tuple(output.shape)}"
                               f", the perturbation {tuple(self.delta.shape)}")
        return output + self.delta.to(output.dtype)

    def run(self, mb, delta):
        """The model output of mb's batch with `delta` added to its input embeddings (the step's precision)."""
        self.delta, self.armed = delta, True
        out = mb.forward(**mb.batch)
        if self.armed:  # the hook never fired: delta would silently be ignored
            self.armed = False
            raise TunelabError(f"adversarial training: {type(mb.model).__name__}'s forward did not call its "
                               "input embedding module")
        return out


@contextmanager
def shifted(model):
    """A _Shift on the model's input embedding, removed on exit (also on an exception)."""
    shift = _Shift(input_embedding(model))
    try:
        yield shift
    finally:
        shift.handle.remove()


def _shape(model, batch) -> tuple[torch.Size, torch.Tensor]:
    """(delta's shape (B, T, H), the padding mask (B, T, 1) as floats) of a batch."""
    ids = batch["input_ids"]
    module = input_embedding(model)
    width = getattr(module, "embedding_dim", None) or module.weight.shape[-1]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    return torch.Size((*ids.shape, width)), mask.unsqueeze(-1).float()


def norms(x: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norms of (B, T, H) -> (B, 1, 1), in float32."""
    return x.detach().flatten(1).float().norm(dim=1).view(-1, 1, 1)


def unit(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """g (B, T, H) with padding masked out, scaled to unit norm per example (zero stays zero)."""
    g = g.detach().float() * mask
    return g / norms(g).clamp_min(1e-12)


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """delta (B, T, H) onto the per-example L2 ball of radius epsilon."""
    return delta * (epsilon / norms(delta).clamp_min(1e-12)).clamp(max=1.0)


def _ascent_grad(loss: torch.Tensor, delta: torch.Tensor, name: str) -> torch.Tensor:
    """d loss / d delta, without touching the parameters' .grad."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        # DDP expects a backward after every synchronised forward; autograd.grad is not one.
        raise TunelabError(f"robust.adversarial={name} needs input-gradient passes of its own here (PGD's steps "
                           "after the first; FGM on frozen embeddings), which a distributed run cannot take; "
                           "use robust.adversarial=freelb (or fgm with trainable embeddings)")
    return torch.autograd.grad(loss, delta)[0]


class _CleanGradient:
    """`watch(model)`: around the clean forward and backward, keeps d objective / d (input embeddings) of the
    first call of the embedding module (the clean pass; R-Drop's second pass comes later) in `self.grad`,
    when that output is in the graph. Consumed by `take()`."""
    grad = None

    @contextmanager
    def watch(self, model):
        self.grad, seen = None, []

        def keep(grad):
            self.grad = grad.detach()

        def hook(module, inputs, output):
            if not seen:
                seen.append(True)
                if output.requires_grad:
                    output.register_hook(keep)

        handle = input_embedding(model).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def take(self, shape: torch.Size):
        """The captured gradient if it has delta's shape (else None: compute it), forgotten afterwards."""
        grad, self.grad = self.grad, None
        return grad if grad is not None and grad.shape == shape else None


def _logs(loss: torch.Tensor, delta: torch.Tensor) -> dict:
    return {"loss": loss.item(), "delta_norm": norms(delta).mean().item()}


class FGM(_CleanGradient):
    """Fast gradient method (Miyato et al. 2017): delta = epsilon * g / ||g|| per example, g the gradient of the
    clean objective w.r.t. the input embeddings (captured from the clean backward). Cost: one forward +
    backward (the adversarial loss, into .grad); one more forward + input-gradient pass where the clean pass
    has no embedding gradient (frozen embeddings)."""
    name = "fgm"

    def __init__(self, epsilon: float = 1.0):
        self.epsilon = epsilon

    def __call__(self, mb, backward) -> dict:
        shape, mask = _shape(mb.model, mb.batch)
        g = self.take(shape)
        with shifted(mb.model) as shift:
            if g is None:
                zero = torch.zeros(shape, device=mask.device, requires_grad=True)
                g = _ascent_grad(shift.run(mb, zero).loss, zero, self.name)
            delta = self.epsilon * unit(g, mask)
            loss = shift.run(mb, delta).loss
            backward(loss)
        self.last = delta  # for inspection (tests); (B, T, H)
        return _logs(loss, delta)


class PGD(_CleanGradient):
    """Projected gradient descent (Madry et al. 2018), L2 per example: K ascent steps
    delta <- project(delta + alpha * g / ||g||, epsilon) from delta = 0, then the loss at the final delta goes
    to backward (only that pass's gradient reaches .grad, as in the common PGD-for-NLP implementations).
    The first step's g is the clean pass's (as FGM's). Cost: K - 1 forward + input-gradient passes and one
    forward + backward."""
    name = "pgd"

    def __init__(self, epsilon: float = 1.0, alpha: float = 0.3, steps: int = 3):
        self.epsilon, self.alpha, self.steps = epsilon, alpha, steps

    def __call__(self, mb, backward) -> dict:
        shape, mask = _shape(mb.model, mb.batch)
        with shifted(mb.model) as shift:
            delta, g = torch.zeros(shape, device=mask.device), self.take(shape)
            for _ in range(self.steps):
                if g is None:
                    delta.requires_grad_(True)
                    g = _ascent_grad(shift.run(mb, delta).loss, delta, self.name)
                delta, g = project(delta.detach() + self.alpha * unit(g, mask), self.epsilon), None
            loss = shift.run(mb, delta).loss
            backward(loss)
        self.last = delta
        return _logs(loss, delta)


class FreeLB:
    """FreeLB (Zhu et al. 2020): delta starts uniform in the ball, U(-1, 1) * epsilon / sqrt(L_i * H) per
    example (L_i its unpadded length: the paper's init normalised by the sequence dims); then K times: the
    adversarial loss / K goes to backward (parameter gradients accumulate over the K passes) and delta takes an
    ascent step of size alpha along its normalised gradient, projected onto the epsilon ball. Cost: K forward +
    backward passes. The initial noise comes from this component's own torch.Generator (seeded; its state is
    checkpointed through state_dict / load_state_dict), so runs and resumed runs draw the same deltas."""
    name = "freelb"

    def __init__(self, epsilon: float = 1.0, alpha: float = 0.3, steps: int = 3, seed: int = 0):
        self.epsilon, self.alpha, self.steps = epsilon, alpha, steps
        self.generator = torch.Generator().manual_seed(seed)

    def init(self, shape: torch.Size, mask: torch.Tensor) -> torch.Tensor:
        """The starting delta (B, T, H) on mask's device (drawn on the CPU, from the generator)."""
        noise = (torch.rand(shape, generator=self.generator) * 2 - 1).to(mask.device) * mask
        dims = mask.sum(dim=(1, 2), keepdim=True).clamp_min(1) * shape[-1]
        return noise * self.epsilon / dims.sqrt()

    def __call__(self, mb, backward) -> dict:
        shape, mask = _shape(mb.model, mb.batch)
        delta, losses = self.init(shape, mask), []
        with shifted(mb.model) as shift:
            for k in range(self.steps):
                delta.requires_grad_(True)
                loss = shift.run(mb, delta).loss
                backward(loss / self.steps)  # also leaves d loss / d delta in delta.grad
                losses.append(loss.item())
                if k + 1 < self.steps:  # the last ascent step would not be used
                    delta = project(delta.detach() + self.alpha * unit(delta.grad, mask), self.epsilon)
        self.last = delta.detach()
        return {"loss": sum(losses) / len(losses), "delta_norm": norms(delta).mean().item()}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())  # checkpoints load onto the training device
