"""A linear-chain CRF over an NER model's word scores (model.crf): trained jointly with the encoder by the
sequence log-likelihood, decoded by Viterbi.

The token-classification head's logits at each word's first sub-token are the emission scores; the CRF adds a
score for every tag-to-tag move, for the first tag and for the last. Moves IOB2 forbids (O -> I-X, B-X -> I-Y)
are fixed at -1e4 in both training and decoding, so the model only ever learns and emits valid paths. The first
tag's constraint (no I-X) applies in decoding only: a training window cut from a long sentence may start inside
an entity.

The CRF is attached to the transformers model as its `crf` submodule, so the optimizer, checkpoints and device
moves carry it; the saved folder keeps it out of model.safetensors (plain transformers loads the folder as a
token classifier: the emissions alone, argmax-decoded) and in crf.safetensors beside it, which tunelab's
Predictor, server and ONNX export read back.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.tasks.ner import iob2_transitions

FILE = "crf.safetensors"
FORBIDDEN = -1e4  # finite: the forward algorithm's logsumexp stays free of inf - inf


class CRF(torch.nn.Module):
    def __init__(self, labels: list[str]):
        super().__init__()
        n = len(labels)
        self.labels = list(labels)
        self.transitions = torch.nn.Parameter(torch.zeros(n, n))  # [previous tag, next tag]
        self.start = torch.nn.Parameter(torch.zeros(n))
        self.end = torch.nn.Parameter(torch.zeros(n))
        allowed, _ = iob2_transitions(self.labels)
        self.register_buffer("allowed", torch.tensor(allowed), persistent=False)

    def moves(self) -> torch.Tensor:
        return self.transitions.float().masked_fill(~self.allowed, FORBIDDEN)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each sequence's gold tags. emissions (B, W, L); tags (B, W); mask (B, W),
        true on a row's first words (left-aligned). A row without words contributes 0."""
        emissions, moves = emissions.float(), self.moves()
        start, end = self.start.float(), self.end.float()
        lengths = mask.sum(1)
        tags = tags.masked_fill(~mask, 0)
        gold = start[tags[:, 0]] + (emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1) * mask).sum(1)
        gold = gold + (moves[tags[:, :-1], tags[:, 1:]] * mask[:, 1:]).sum(1)
        gold = gold + end[tags.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)]
        alpha = start + emissions[:, 0]  # (B, L): log-sum of the scores of every path ending in each tag
        for t in range(1, emissions.shape[1]):
            step = torch.logsumexp(alpha.unsqueeze(2) + moves + emissions[:, t].unsqueeze(1), dim=1)
            alpha = torch.where(mask[:, t:t + 1], step, alpha)
        log_z = torch.logsumexp(alpha + end, dim=1)
        return (log_z - gold) * (lengths > 0)

    def word_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The CRF loss of a batch of token logits (B, T, L) whose labels (B, T) are -100 except at words'
        first sub-tokens: the words' rows are gathered left-aligned, and the loss is the summed sequence NLL
        per word (the scale of the per-token cross-entropy it replaces)."""
        mask = labels != -100
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # word positions first, in order
        idx = order[:, :max(1, int(mask.sum(1).max()))]
        emissions = logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        words = mask.gather(1, idx)
        return self.nll(emissions, labels.gather(1, idx), words).sum() / words.sum().clamp(min=1)

    def scores(self) -> dict:
        """What decoding needs, as numpy arrays: transitions (forbidden moves included as learnt; the decoder
        applies the constraints), start and end."""
        return {k: getattr(self, k).detach().float().cpu().numpy() for k in ("transitions", "start", "end")}


def attach(model, labels: list[str]) -> CRF:
    """A new CRF as the model's `crf` submodule, on the model's device."""
    device = next(model.parameters()).device
    model.crf = CRF(labels).to(device)
    return model.crf


def load(model, folder, labels: list[str]) -> CRF:
    """The CRF saved beside a model folder, attached to its model."""
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    if not path.is_file():
        raise TunelabError(f"{folder}: this NER model was trained with model.crf, but {FILE} is missing from its "
                           "folder; copy it back from the run's output folder")
    crf = attach(model, labels)
    state = load_file(str(path))
    if state.get("transitions") is None or tuple(state["transitions"].shape) != (len(labels), len(labels)):
        raise TunelabError(f"{path}: its transitions do not match the model's {len(labels)} labels")
    crf.load_state_dict(state)
    return crf


def save(crf: CRF, folder) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in crf.state_dict().items()},
              str(Path(folder) / FILE), metadata={"labels": json.dumps(crf.labels)})


@contextmanager
def detached(model):
    """The model without its CRF for the duration (save_pretrained writes the transformers weights only)."""
    crf = model._modules.pop("crf", None)
    try:
        yield crf
    finally:
        if crf is not None:
            model.crf = crf
