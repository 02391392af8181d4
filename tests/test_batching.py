"""Dynamic padding and the epoch batch order."""

import random

import torch

from tunelab.data.batching import collate, epoch_batches, eval_batches


def test_collate_token_labels_pads_to_longest():
    feats = [{"input_ids": [101, 5, 6, 102], "labels": [-100, 1, 2, -100]},
             {"input_ids": [101, 7, 102], "labels": [-100, 3, -100]}]
    b = collate(feats, pad_id=0)
    assert b["input_ids"].tolist() == [[101, 5, 6, 102], [101, 7, 102, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 1, 2, -100], [-100, 3, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_dynamic_not_fixed_length():
    short = collate([{"input_ids": [1, 2], "labels": [0, 0]}] * 3, pad_id=9)
    assert short["input_ids"].shape == (3, 2)
    longer = collate([{"input_ids": list(range(1, 12)), "labels": [0] * 11}, {"input_ids": [1], "labels": [0]}], 9)
    assert longer["input_ids"].shape == (2, 11)
    assert longer["input_ids"][1].tolist() == [1] + [9] * 10


def test_collate_sequence_labels():
    b = collate([{"input_ids": [101, 5, 102], "labels": 2}, {"input_ids": [101, 102], "labels": 0}], pad_id=0)
    assert b["labels"].tolist() == [2, 0]
    assert b["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]


def skewed_lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(5, 15), rng.randint(100, 250)]) if rng.random() < 0.3 else rng.randint(5, 40)
            for _ in range(n)]


def padding(lengths, batches):
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / slots


def test_epoch_batches_cover_every_index_once():
    lengths = skewed_lengths(1003)
    for group in (True, False):
        for epoch in range(3):
            batches = epoch_batches(lengths, 32, seed=7, epoch=epoch, group_by_length=group)
            flat = [i for b in batches for i in b]
            assert sorted(flat) == list(range(len(lengths)))
            assert all(1 <= len(b) <= 32 for b in batches)
            assert sum(len(b) < 32 for b in batches) <= (1 if not group else len(lengths) // (32 * 64) + 1)


def test_epoch_batches_deterministic_in_seed_and_epoch():
    lengths = skewed_lengths(500)
    for group in (True, False):
        a = epoch_batches(lengths, 16, seed=3, epoch=1, group_by_length=group)
        assert a == epoch_batches(lengths, 16, seed=3, epoch=1, group_by_length=group)
        assert a != epoch_batches(lengths, 16, seed=3, epoch=2, group_by_length=group)
        assert a != epoch_batches(lengths, 16, seed=4, epoch=1, group_by_length=group)
    # independent of any global random state
    random.seed(123)
    torch.manual_seed(123)
    b = epoch_batches(lengths, 16, seed=3, epoch=1, group_by_length=True)
    random.seed(999)
    assert b == epoch_batches(lengths, 16, seed=3, epoch=1, group_by_length=True)


def test_group_by_length_saves_padding():
    lengths = skewed_lengths(2000)
    grouped = epoch_batches(lengths, 32, seed=1, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 32, seed=1, epoch=0, group_by_length=False)
    assert padding(lengths, plain) > 0.5
    assert padding(lengths, grouped) < padding(lengths, plain) / 3
    # batches are still shuffled: not simply sorted from longest to shortest
    maxes = [max(lengths[i] for i in b) for b in grouped]
    assert maxes != sorted(maxes, reverse=True)
    # different epochs put examples with different neighbours
    other = epoch_batches(lengths, 32, seed=1, epoch=1, group_by_length=True)
    assert {frozenset(b) for b in grouped} != {frozenset(b) for b in other}


def test_eval_batches_sorted():
    lengths = [3, 10, 7, 1, 10, 4, 9, 8]
    batches = eval_batches(lengths, 4, max_padding=1.0)  # no padding limit: cut by count only
    assert sorted(i for b in batches for i in b) == list(range(8))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert [len(b) for b in batches] == [4, 4]


def test_eval_batches_bound_the_padding():
    lengths = [3, 10, 7, 1, 10, 4, 9, 8]
    batches = eval_batches(lengths, 4)
    assert [[lengths[i] for i in b] for b in batches] == [[10, 10, 9, 8], [7], [4, 3], [1]]
    for b in batches:  # at most 20 % of a batch's slots are padding
        slots = len(b) * max(lengths[i] for i in b)
        assert slots - sum(lengths[i] for i in b) <= 0.2 * slots
    assert eval_batches([5] * 10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_epoch_batches_put_the_longest_batch_first():
    # (the allocator then reuses the largest step's memory for every later step; see epoch_batches)
    rng = random.Random(5)
    lengths = [rng.randint(3, 90) for _ in range(500)]
    for group in (True, False):
        for epoch in range(3):
            batches = epoch_batches(lengths, 16, seed=1, epoch=epoch, group_by_length=group)
            assert max(lengths[i] for i in batches[0]) == max(lengths)
            rest = epoch_batches(lengths, 16, seed=1, epoch=epoch, group_by_length=group, longest_first=False)
            k = rest.index(batches[0])  # the same batches; only the longest one moved to the front
            assert batches == [rest[k]] + rest[:k] + rest[k + 1:]


def test_longest_first_moves_a_whole_accumulation_step():
    # 2 batches of 4 accumulated are the batch of 8 split in two, longest first or not
    rng = random.Random(9)
    lengths = [rng.randint(3, 90) for _ in range(200)]
    eights = epoch_batches(lengths, 8, seed=2, epoch=0, group_by_length=False)
    fours = epoch_batches(lengths, 4, seed=2, epoch=0, group_by_length=False, step_batches=2)
    assert [a + b for a, b in zip(fours[::2], fours[1::2])] == eights
    assert max(lengths) in [lengths[i] for i in eights[0]]
