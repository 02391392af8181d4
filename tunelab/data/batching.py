"""Batches: dynamic padding (to the longest sequence in the batch, never to a fixed length) and
length-grouped batch order, so that little compute is spent on padding."""

import random

import torch


def collate(features: list[dict], pad_id: int, multiple: int = 1) -> dict:
    """input_ids/attention_mask (and token_type_ids, where features have them: text pairs): (batch, longest),
    the length rounded up to a multiple of `multiple` (train.pad_to_multiple_of: fewer distinct shapes).
    labels, by what a feature's "labels" is: a list of ints, token labels -> (batch, longest label list) with
    -100 padding (as long as the inputs, except an encoder-decoder's decoder labels); an int, a class ->
    (batch,) long; a float, a regression target -> (batch,) float; a tuple of floats, a multi-hot label vector
    -> (batch, labels) float. start_positions/end_positions (extractive QA): (batch,) long."""
    longest = padded_length([len(f["input_ids"]) for f in features], multiple)
    ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), longest), dtype=torch.long)
    types = torch.zeros((len(features), longest), dtype=torch.long) if "token_type_ids" in features[0] else None
    batch = {"input_ids": ids, "attention_mask": mask}
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = torch.tensor(f["token_type_ids"])
    if types is not None:
        batch["token_type_ids"] = types
    if "start_positions" in features[0]:  # extractive QA: the answer span's token positions are the targets
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch
    first = features[0]["labels"]
    if isinstance(first, list):
        width = padded_length([len(f["labels"]) for f in features], multiple)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
    else:
        as_float = isinstance(first, (float, tuple))
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.float if as_float else torch.long)
    return batch | {"labels": labels}


def padded_length(lengths: list[int], multiple: int = 1) -> int:
    """The length collate pads a batch of these lengths to."""
    longest = max(lengths)
    return longest + -longest % multiple


def model_inputs(batch: dict) -> dict:
    """What a forward pass for outputs (no loss) takes of a batch: the inputs, not the targets."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool,
                  mega: int = 64, longest_first: bool = True, step_batches: int = 1) -> list[list[int]]:
    """The batch order of one epoch, a pure function of (seed, epoch) so that a resumed run replays it.

    Length grouping: shuffle, cut into mega-batches of `mega` batches, sort each by length, batch, then
    shuffle the batches; examples meet different neighbours every epoch yet each batch is nearly uniform.

    The batch holding the longest sequence goes first. On a CPU this is worth 0.5-0.8 GiB of peak memory on
    CoNLL-2003 with MiniLM and a few % of training speed (bench/profile_step.py, docs/benchmarks.md): glibc's
    malloc hands blocks above its mmap threshold back to the kernel when they are freed and raises that
    threshold only to the largest block freed so far, so batches in random length order keep mapping fresh pages for each new longest batch
    (page faults the kernel must zero) while smaller blocks fragment the heap; after the longest batch
    first, later batches' tensors reuse its freed memory. (A GPU's caching allocator gains the same way, and
    an out-of-memory batch size fails at the first step instead of hours in.) longest_first=False only
    measures what this is worth. step_batches: the batches of one optimizer step (gradient accumulation)
    move together, so that accumulating k batches of n is still one batch of k*n split in k.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        size = batch_size * mega
        order = [i for k in range(0, len(order), size)
                 for i in sorted(order[k:k + size], key=lambda j: -lengths[j])]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    if batches and longest_first:
        steps = [batches[k:k + step_batches] for k in range(0, len(batches), step_batches)]
        longest = max(range(len(steps)), key=lambda s: max(lengths[i] for b in steps[s] for i in b))
        steps.insert(0, steps.pop(longest))
        batches = [b for step in steps for b in step]
    return batches


def eval_batches(lengths: list[int], batch_size: int, max_padding: float = 0.2) -> list[list[int]]:
    """Sorted by length for inference, longest first, at most `batch_size` a batch; a batch also ends before
    padding would exceed `max_padding` of its slots. Over a whole data set neighbours in length order are
    nearly equal and this rarely cuts; over a few texts of mixed lengths (a served micro-batch) one batch
    padded to the longest would spend most of its compute on padding (measured on CoNLL-2003 sentences in
    groups of 32: 1.9x the throughput of one padded batch)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    batches, cur, real = [], [], 0
    for j in order:
        if cur:
            slots = (len(cur) + 1) * lengths[cur[0]]
            if len(cur) >= batch_size or slots - real - lengths[j] > max_padding * slots:
                batches.append(cur)
                cur, real = [], 0
        cur.append(j)
        real += lengths[j]
    if cur:
        batches.append(cur)
    return batches
