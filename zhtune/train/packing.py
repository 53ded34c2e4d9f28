"""Padding-free packing: many short samples in one row, with no attention and no loss across them.

A packed row is the samples laid end to end, with `position_ids` that restart at 0 where each sample
starts. transformers (5.x) reads those restarts (`masking_utils.find_packed_sequence_indices`) and
builds a document mask for every attention kind (a BlockMask for flex_attention, a 4D mask for
eager/sdpa), so a token only sees earlier tokens of its own sample, and rotary positions are the
sample's own. The row must carry no `attention_mask`: with one, transformers skips the detection.

Labels are NOT shifted (the transformers convention: the loss predicts `labels[t + 1]` from token t).
The first label of every sample is forced to -100, so the last token of one sample is never trained
to predict the first token of the next.

flex_attention needs the row length to be a multiple of its block size (128): transformers' packed
mask functions index `position_ids` with block-padded indices and read past the end otherwise (seen
on transformers 5.17 and 5.24: NaN or wrong logits for a 24-token packed row, exact for 128). So the
collator pads the tail with one extra dummy sample (pad ids, positions from 0, labels -100).
"""

import bisect
import random

import torch

from zhtune.templates.base import IGNORE_INDEX

FLEX_BLOCK = 128


def pack_encoded(items, max_length: int, seed: int = 42) -> list[dict]:
    """Pack encoded samples (`.input_ids`, `.labels`, or dicts with those keys) into rows of at most
    `max_length` tokens, best-fit decreasing: each sample, longest first, goes into the fullest row it
    still fits in. Rows come back in a seeded random order, so training does not see long rows first.

    Each row: {"input_ids": [...], "labels": [...], "position_ids": [...]} (plain lists), positions
    restarting at 0 per sample, the first label of each sample -100.
    """
    samples = [(_get(it, "input_ids"), _get(it, "labels")) for it in items]
    for i, (ids, labels) in enumerate(samples):
        if len(ids) != len(labels):
            raise ValueError(f"sample {i}: {len(ids)} input_ids but {len(labels)} labels")
        if len(ids) > max_length:
            raise ValueError(f"sample {i} has {len(ids)} tokens, more than max_length={max_length}: "
                             "encode with the same --max_length (truncation_strategy delete drops such rows)")
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)  # ties in length are broken by the seed, not by input order
    order.sort(key=lambda i: len(samples[i][0]), reverse=True)

    rows: list[list[int]] = []  # sample indices of each row
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = len(samples[i][0])
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    rng.shuffle(rows)
    return [_join([samples[i] for i in row]) for row in rows]


def _get(item, key):
    return item[key] if isinstance(item, dict) else getattr(item, key)


def _join(samples) -> dict:
    input_ids, labels, position_ids = [], [], []
    for ids, lab in samples:
        if not len(ids):
            continue
        input_ids.extend(ids)
        labels.append(IGNORE_INDEX)  # never predict a sample's first token from the previous sample
        labels.extend(lab[1:])
        position_ids.extend(range(len(ids)))
    return {"input_ids": list(input_ids), "labels": labels, "position_ids": position_ids}


class PackedCollator:
    """Rows from `pack_encoded` -> one padding-free row: tensors of shape [1, T] for input_ids,
    labels (unshifted, -100 at every sample start and on padding) and position_ids. No attention_mask.

    Several rows of a batch are concatenated into the one row (their boundaries are sample
    boundaries). T is padded to a multiple of `pad_to_multiple_of` (at least the flex block size 128;
    pass max_length for one fixed shape, which torch.compile likes) with a dummy sample of `pad_id`.
    """

    def __init__(self, pad_id: int = 0, pad_to_multiple_of: int = FLEX_BLOCK):
        if pad_to_multiple_of % FLEX_BLOCK:
            raise ValueError(f"pad_to_multiple_of must be a multiple of {FLEX_BLOCK} (flex_attention's block)")
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        input_ids, labels, position_ids = [], [], []
        for row in rows:
            if "position_ids" not in row:  # a plain encoded sample: a row of one
                row = _join([(row["input_ids"], row["labels"])])
            input_ids.extend(row["input_ids"])
            labels.extend(row["labels"])
            position_ids.extend(row["position_ids"])
        if labels:
            labels[0] = IGNORE_INDEX
        pad = -len(input_ids) % self.multiple
        input_ids.extend([self.pad_id] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        position_ids.extend(range(pad))
        return {"input_ids": torch.tensor([input_ids], dtype=torch.long),
                "labels": torch.tensor([labels], dtype=torch.long),
                "position_ids": torch.tensor([position_ids], dtype=torch.long)}


def count_tokens(inputs: dict, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(real tokens, trained tokens) of a collated batch, as 0-dim tensors on the batch's device (no
    GPU sync on the training step's path): padding never counts. A packed row's padding is its last
    segment (position_ids restart at 0) when every token of it is pad_id and untrained."""
    labels = inputs["labels"]
    trained = (labels[..., 1:] != IGNORE_INDEX).sum()
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum(), trained
    ids, positions, flat_labels = (inputs[k].reshape(-1) for k in ("input_ids", "position_ids", "labels"))
    index = torch.arange(ids.numel(), device=ids.device)
    last = torch.where(positions == 0, index, 0).max()  # where the last segment starts
    outside_tail = index < last
    padding_tail = (last > 0) & ((ids == pad_id) | outside_tail).all() & \
        ((flat_labels == IGNORE_INDEX) | outside_tail).all()
    return torch.where(padding_tail, last, ids.numel()), trained


class PaddedCollator:
    """Samples -> a right-padded batch [B, T]: input_ids, attention_mask (1 on real tokens), labels
    (unshifted, -100 on padding). The exact plain path's batches: one sample per row, so no sample
    ever sees another."""

    def __init__(self, pad_id: int = 0, pad_to_multiple_of: int = 1):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        longest += -longest % self.multiple
        input_ids, labels, mask = [], [], []
        for r in rows:
            pad = longest - len(r["input_ids"])
            input_ids.append(list(r["input_ids"]) + [self.pad_id] * pad)
            labels.append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * len(r["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long)}
