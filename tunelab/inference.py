"""Batched inference: length-sorted batches (shared across a distributed run's ranks) and the logits of
encoded features. Tasks build their predict/evaluate on these; nothing here knows a task type."""

import torch

from tunelab import progress
from tunelab.data.batching import collate, eval_batches, model_inputs
from tunelab.runtime import autocast, eval_mode


def inference_batches(features: list[dict], batch_size: int, desc: str | None, dist=None):
    """(position, feature indices) of length-sorted batches, with a progress bar when `desc` is given.

    dist (tunelab.distributed.Dist): a distributed run's evaluation; this rank gets every world-th batch
    of the very batches one process would run (so its outputs are the same), to be gathered by position."""
    batches = list(enumerate(eval_batches([len(f["input_ids"]) for f in features], batch_size)))
    if dist is not None and dist.world > 1:
        batches = batches[dist.rank::dist.world]
    return progress.bar(iterable=batches, desc=desc, disable=desc is None, leave=False, unit="batch")


@torch.inference_mode()
def feature_logits(model, features: list[dict], pad_id: int, device, bf16=False, batch_size=64,
                   desc: str | None = None, dist=None) -> list:
    """Logits per feature, as float32 numpy: (seq, labels) trimmed to the feature's length, or (labels,);
    extractive QA: (seq, 2), the start and end logits.
    dist: computed across a distributed run's ranks and gathered, every feature's logits on every rank."""
    out = {}
    with eval_mode(model):
        for _, idx in inference_batches(features, batch_size, desc, dist):
            batch = collate([features[i] for i in idx], pad_id)
            with autocast(device, bf16):
                output = model(**{k: v.to(device) for k, v in model_inputs(batch).items()})
            if "start_logits" in output:  # extractive QA: (seq, 2), start and end logits of each token
                logits = torch.stack([output.start_logits, output.end_logits], dim=-1)
            else:
                logits = output.logits
            logits = logits.float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = logits[row, : len(features[i]["input_ids"])] if logits.ndim == 3 else logits[row]
    if dist is not None:
        out = dist.gather(out)
    return [out[i] for i in range(len(features))]
