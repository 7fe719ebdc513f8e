"""Pieces every collator shares: input validation, fast padding, reproducible randomness.

Collators build their tensors straight from the id arrays (one ``numpy`` scatter per batch) instead of
going through ``tokenizer.pad``, which is where ``transformers``' collators spend most of their time.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def as_number(name: str, value: Any, requirement: str) -> float:
    """``value`` as a Python float, or a ``ValueError`` naming ``name`` and ``requirement``.

    Python and numpy numbers are accepted (settings often come out of numpy or a float32 config). A numpy
    float reads as the decimal it prints as, so ``np.float32(0.15)`` is 0.15 and not 0.15000000596, which
    would change counts that round at .5 (BERT's ``round(30 * 0.15)``). Bools, strings and NaN are refused.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}.")
    return float(str(value)) if isinstance(value, np.floating) else float(value)


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a number in ``[0, 1]``."""
    requirement = "a probability in [0, 1]"
    number = as_number(name, value, requirement)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"`{name}` must be {requirement}, got {value!r}.")
    return number


def check_tokenizer(tokenizer: Any) -> None:
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            f"`tokenizer` must be a transformers tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}."
        )


def require_token_id(tokenizer: PreTrainedTokenizerBase, attribute: str, objective: str) -> int:
    """Return ``tokenizer.<attribute>`` (e.g. ``mask_token_id``), or raise a ``ValueError`` saying why it is needed."""
    token_id = getattr(tokenizer, attribute, None)
    if token_id is None:
        raise ValueError(
            f"The tokenizer has no `{attribute}`, which {objective} needs. Use a tokenizer that defines it "
            f"or add it with `tokenizer.add_special_tokens(...)` (and resize the model's embeddings)."
        )
    return int(token_id)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All ids the tokenizer treats as special (pad, cls, sep, mask, sentinels, …), sorted."""
    return np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)


def vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of ids the tokenizer can produce, added tokens included."""
    return len(tokenizer)


def input_id_arrays(features: Sequence[Mapping[str, Any]], key: str = "input_ids") -> list[np.ndarray]:
    """Validate ``features`` and return each row's ``key`` as a 1-D ``int64`` array."""
    if isinstance(features, Mapping) or not isinstance(features, Sequence):
        raise TypeError(
            f"`features` must be a list of dicts (one per example), got {type(features).__name__}."
        )
    if len(features) == 0:
        raise ValueError("`features` is empty: a collator needs at least one example.")
    rows = []
    for index, feature in enumerate(features):
        if not isinstance(feature, Mapping):
            raise TypeError(f"`features[{index}]` must be a dict, got {type(feature).__name__}.")
        if key not in feature:
            raise ValueError(f"`features[{index}]` has no `{key}` key (keys: {sorted(feature)}).")
        row = feature[key]
        row = row.numpy() if isinstance(row, torch.Tensor) else np.asarray(row)
        if row.ndim != 1 or not (row.dtype.kind in "iu" or row.size == 0):
            raise ValueError(f"`features[{index}]['{key}']` must be a 1-D sequence of token ids.")
        rows.append(row.astype(np.int64, copy=False))
    if all(len(row) == 0 for row in rows):
        raise ValueError(
            f"Every row of `features` has an empty `{key}` ({len(rows)} rows): nothing to train on; was the text "
            "empty, or cut to length 0?"
        )
    return rows


def flat_input_ids(features: Sequence[Mapping[str, Any]], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``input_ids`` of all rows as one flat array plus the row lengths; ids must be in ``[0, size)``."""
    rows = input_id_arrays(features)
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    tokens = np.concatenate(rows)
    check_token_ids(tokens, lengths, size)
    return tokens, lengths


def check_token_ids(tokens: np.ndarray, lengths: np.ndarray, size: int, key: str = "input_ids") -> None:
    """Raise a ``ValueError`` naming the first row whose ids fall outside ``[0, size)``.

    ``tokens`` are the rows concatenated (row ``r`` has ``lengths[r]`` ids). A -100 here is a label padding
    value fed as an input, and an id >= ``size`` comes from another tokenizer; both would otherwise index
    past the embeddings, or, as a label, silently drop a position from the loss.
    """
    bad = (tokens < 0) | (tokens >= size)
    if not bad.any():
        return
    position = int(np.argmax(bad))
    row = int(np.searchsorted(np.cumsum(lengths), position, side="right"))
    raise ValueError(
        f"`features[{row}]['{key}']` holds the id {tokens[position]}, outside the tokenizer's vocabulary [0, {size}): "
        "was the data tokenized with another tokenizer, or padded with -100?"
    )


def padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of is None:
        return longest
    if pad_to_multiple_of < 1:
        raise ValueError(f"`pad_to_multiple_of` must be >= 1, got {pad_to_multiple_of}.")
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def pad_flat(
    flat: np.ndarray, lengths: np.ndarray, pad_value: int, pad_to_multiple_of: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter consecutive rows of ``flat`` (sizes ``lengths``) into one right-padded ``[rows, width]`` array.

    Also returns the boolean "real token" mask. One numpy scatter for the whole batch.
    """
    width = padded_length(int(lengths.max(initial=0)), pad_to_multiple_of)
    mask = np.arange(width) < lengths[:, None]
    out = np.full((len(lengths), width), pad_value, dtype=np.int64)
    out[mask] = flat
    return out, mask


def seq2seq_batch(
    inputs: np.ndarray,
    input_lengths: np.ndarray,
    targets: np.ndarray,
    target_lengths: np.ndarray,
    pad_token_id: int,
    decoder_start_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """The encoder-decoder batch from flat corrupted inputs and flat targets (rows given by their lengths).

    Returns ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding) and ``decoder_input_ids``.
    """
    input_ids, attention_mask = pad_flat(inputs, input_lengths, pad_token_id, pad_to_multiple_of)
    labels, _ = pad_flat(targets, target_lengths, IGNORE_INDEX, pad_to_multiple_of)
    return to_tensors(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask.astype(np.int64),
            "labels": labels,
            "decoder_input_ids": shift_right(labels, decoder_start_token_id, pad_token_id),
        }
    )


def shift_right(labels: np.ndarray, decoder_start_token_id: int, pad_token_id: int) -> np.ndarray:
    """Decoder inputs for teacher forcing: ``labels`` shifted one to the right, ``-100`` read as pad."""
    shifted = np.empty_like(labels)
    shifted[:, 0] = decoder_start_token_id
    shifted[:, 1:] = labels[:, :-1]
    shifted[shifted == IGNORE_INDEX] = pad_token_id
    return shifted


class SeededRandomness:
    """Reproducible randomness for a collator that may be copied into DataLoader workers.

    With ``seed`` set, the stream is a pure function of ``(seed, rank, worker id)`` and the number of
    batches drawn so far, so a rerun gives identical batches and workers/ranks do not repeat each other.
    With ``seed=None`` each batch draws its seed from torch's global generator, so
    ``transformers.set_seed`` (which ``Trainer`` calls with ``args.seed``) makes runs reproducible.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative int or None, got {seed!r}.")
        self.seed = seed
        self._generator: np.random.Generator | None = None
        self._owner_pid: int | None = None

    def generator(self) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        if self._generator is None or self._owner_pid != os.getpid():
            worker = torch.utils.data.get_worker_info()
            rank = int(os.environ.get("RANK", 0))
            self._generator = np.random.default_rng([self.seed, rank, worker.id if worker else 0])
            self._owner_pid = os.getpid()
        return self._generator


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Wrap numpy arrays as torch tensors without copying."""
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}
