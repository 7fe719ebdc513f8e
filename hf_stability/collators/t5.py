"""T5 span corruption, as in ``t5.data.preprocessors.span_corruption`` (Raffel et al. 2020).

Per row of ``L`` raw tokens (no EOS): ``round(L * noise_density)`` noise tokens (clamped to ``[1, L-1]``)
split into ``max(1, round(noise / mean_noise_span_length))`` spans; noise and non-noise tokens are each cut
into that many non-empty parts uniformly at random and interleaved, non-noise first. Each noise span
becomes one sentinel in the inputs; the targets list each sentinel followed by the span it replaced:

    inputs  = nn0 <extra_id_0> nn1 <extra_id_1> … nn_k <extra_id_k> EOS
    targets = <extra_id_0> n0 <extra_id_1> n1 … <extra_id_k> n_k EOS

Like T5, a 1-token row is corrupted as if it had 2 tokens and the noise mask cut back to the row: it keeps
its token, so inputs are ``tok EOS`` and targets ``<extra_id_0> EOS``.

The counts are computed in float32 and rounded half to even, like the TensorFlow original. T5's length
helper works in float64, so for a few (length, density) pairs the two disagree by a token, in T5 as here:
95 raw tokens at density 0.3 give 29 noise tokens (float32: 28.500001) where the helper assumes 28. The
usual settings agree exactly: 568 raw tokens give 512 inputs and 114 targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hf_stability.collators._common import (
    SeededRandomness,
    as_number,
    check_tokenizer,
    flat_input_ids,
    require_token_id,
    seq2seq_batch,
)
from hf_stability.collators._ragged import choose_distinct, exclusive_cumsum

OBJECTIVE = "T5 span corruption"


def t5_span_corruption_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """Raw row length and target length that make span corruption produce exactly ``inputs_length`` inputs.

    Same search as T5's ``random_spans_helper`` (one sentinel per span, EOS on both sides): the largest raw
    length whose corrupted inputs still fit in ``inputs_length``, with T5's adjustment for density 0.5.
    (The ``transformers`` Flax example starts its search one token too high and can overshoot.)

    Returns:
        ``(raw_length, targets_length)``, e.g. ``(568, 114)`` for ``(512, 0.15, 3.0)``.
    """
    noise_density, mean_noise_span_length = _check_noise(noise_density, mean_noise_span_length)
    if not isinstance(inputs_length, int) or isinstance(inputs_length, bool) or inputs_length < 2:
        raise ValueError(f"`inputs_length` must be an int >= 2, got {inputs_length!r}.")

    def corrupted_lengths(raw_length: int) -> tuple[int, int]:
        num_noise = int(round(raw_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1

    raw_length = inputs_length - 1
    while corrupted_lengths(raw_length + 1)[0] <= inputs_length:
        raw_length += 1
    inputs, targets = corrupted_lengths(raw_length)
    if noise_density == 0.5 and targets > inputs:
        raw_length -= 1
        targets -= 1
    return raw_length, targets


def _check_noise(noise_density: float, mean_noise_span_length: float) -> tuple[float, float]:
    """Both settings as floats (numpy numbers accepted), or a ``ValueError`` naming the bad one."""
    density = as_number("noise_density", noise_density, "in the open interval (0, 1)")
    if not 0 < density < 1:
        raise ValueError(f"`noise_density` must be in the open interval (0, 1), got {noise_density!r}.")
    mean = as_number("mean_noise_span_length", mean_noise_span_length, "a number >= 1")
    if not 1 <= mean < float("inf"):
        raise ValueError(f"`mean_noise_span_length` must be a number >= 1, got {mean_noise_span_length!r}.")
    return density, mean


def sentinel_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, … looked up by token string (never by position in the vocab)."""
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    while f"<extra_id_{len(ids)}>" in vocab:
        ids.append(vocab[f"<extra_id_{len(ids)}>"])
    return np.array(ids, dtype=np.int64)


@dataclass
class DataCollatorForT5SpanCorruption:
    """Turn raw token rows (no EOS) into T5 span-corruption examples.

    Args:
        tokenizer: needs ``eos_token``, ``pad_token`` and sentinels ``<extra_id_0>``… (enough for the most
            spans in a row; 100 cover rows up to ~2,000 tokens at the defaults).
        noise_density: fraction of tokens corrupted, in (0, 1).
        mean_noise_span_length: mean corrupted span length, >= 1.
        pad_to_multiple_of: round the padded widths of inputs and labels up to a multiple of this.
        seed: fixes the corruption (see ``SeededRandomness``); ``None`` follows torch's global seed.
        decoder_start_token_id: first decoder input; ``None`` uses the pad id, as T5 does.

    Returns a dict of tensors: ``input_ids`` and ``labels`` (each EOS-terminated; ``labels`` padded with
    -100), ``attention_mask``, ``decoder_input_ids`` (labels shifted right from the decoder start token).

    Rows are raw ids without EOS. A row that ends in EOS anyway (``tokenizer(text)`` adds one by default) has
    that EOS dropped before corruption, so inputs and targets end in exactly one EOS, as in T5. Dropping it
    rather than refusing the batch: a row cut from an EOS-separated token stream can end on a separator, and
    an error there would stop a run at a random step; the text itself is unchanged either way. Ids outside
    the vocabulary (a -100 from label padding, another tokenizer's ids) and empty rows are errors naming
    the row.

    Example:
        >>> collator = DataCollatorForT5SpanCorruption(tokenizer, seed=0)  # doctest: +SKIP
        >>> raw_length, _ = t5_span_corruption_lengths(512)  # rows of 568 tokens -> 512 inputs, 114 labels
    """

    tokenizer: PreTrainedTokenizerBase
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    decoder_start_token_id: int | None = None
    _randomness: SeededRandomness = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_tokenizer(self.tokenizer)
        self.noise_density, self.mean_noise_span_length = _check_noise(self.noise_density, self.mean_noise_span_length)
        self._eos = require_token_id(self.tokenizer, "eos_token_id", OBJECTIVE)
        self._pad = require_token_id(self.tokenizer, "pad_token_id", OBJECTIVE)
        self._sentinels = sentinel_token_ids(self.tokenizer)
        if len(self._sentinels) == 0:
            raise ValueError(
                f"The tokenizer has no sentinel tokens `<extra_id_0>`, `<extra_id_1>`, …, which {OBJECTIVE} needs. "
                "Add them with `tokenizer.add_special_tokens({'additional_special_tokens': [...]})`."
            )
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self._pad
        self._randomness = SeededRandomness(self.seed)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        tokens, lengths = flat_input_ids(features, len(self.tokenizer))
        tokens, lengths = self._drop_final_eos(tokens, lengths)
        # T5 corrupts max(length, 2) tokens and cuts the mask back: give 1-token rows a placeholder second token.
        single = lengths == 1
        tokens = np.insert(tokens, (exclusive_cumsum(lengths) + 1)[single], self._pad)
        lengths = np.maximum(lengths, 2)

        noise, spans = self._span_counts(lengths)
        noise_lengths, nonnoise_lengths = self._span_lengths(lengths, noise, spans)
        inputs, targets = self._corrupt(tokens, lengths, noise, spans, noise_lengths, nonnoise_lengths)
        input_lengths = lengths - noise + spans + 1
        target_lengths = noise + spans + 1
        if single.any():
            # Such a row came out as `tok <X0> EOS` / `<X0> placeholder EOS`: T5's cut mask keeps no noise there.
            inputs = np.delete(inputs, (exclusive_cumsum(input_lengths) + 1)[single])
            targets = np.delete(targets, (exclusive_cumsum(target_lengths) + 1)[single])
            input_lengths, target_lengths = input_lengths - single, target_lengths - single
        return seq2seq_batch(
            inputs, input_lengths, targets, target_lengths, self._pad, cast(int, self.decoder_start_token_id),
            self.pad_to_multiple_of,
        )

    def _drop_final_eos(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop a trailing EOS from each row that has one (the collator appends its own); refuse empty rows."""
        ends = exclusive_cumsum(lengths) + lengths - 1
        has_eos = (lengths > 0) & (tokens[np.maximum(ends, 0)] == self._eos)
        if has_eos.any():
            keep = np.ones(len(tokens), dtype=bool)
            keep[ends[has_eos]] = False
            tokens, lengths = tokens[keep], lengths - has_eos
        empty = np.flatnonzero(lengths == 0)
        if len(empty):
            row = int(empty[0])
            what = "only an EOS" if has_eos[row] else "no token"
            raise ValueError(f"`features[{row}]['input_ids']` holds {what}: span corruption needs at least one token.")
        return tokens, lengths

    def _span_counts(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Noise tokens and noise spans per row, in float32 with round-half-to-even like ``tf.round``."""
        noise = np.rint(lengths.astype(np.float32) * np.float32(self.noise_density)).astype(np.int64)
        noise = np.clip(noise, 1, lengths - 1)
        spans = np.rint(noise.astype(np.float32) / np.float32(self.mean_noise_span_length)).astype(np.int64)
        spans = np.maximum(spans, 1)
        too_many = np.flatnonzero(spans > lengths - noise)
        if len(too_many):
            row = int(too_many[0])
            raise ValueError(
                f"`features[{row}]['input_ids']` ({lengths[row]} tokens) would need {spans[row]} noise spans but has "
                f"only {lengths[row] - noise[row]} non-noise tokens to separate them: lower `noise_density` or raise "
                "`mean_noise_span_length`."
            )
        if spans.max() > len(self._sentinels):
            row = int(np.argmax(spans))
            raise ValueError(
                f"`features[{row}]['input_ids']` needs {spans[row]} sentinels but the tokenizer has only "
                f"{len(self._sentinels)} (`<extra_id_0>`…): use shorter rows or add sentinel tokens."
            )
        return noise, spans

    def _span_lengths(self, lengths: np.ndarray, noise: np.ndarray, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split each row's noise and non-noise tokens into ``spans`` non-empty parts, uniformly at random."""
        rng = self._randomness.generator()
        return _random_segmentation(rng, noise, spans), _random_segmentation(rng, lengths - noise, spans)

    def _corrupt(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray,
        noise: np.ndarray,
        spans: np.ndarray,
        noise_lengths: np.ndarray,
        nonnoise_lengths: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flat inputs and targets (EOS included) for all rows, from the interleaved span lengths."""
        interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).ravel()
        span_start = np.zeros(len(tokens), dtype=np.int64)
        span_start[exclusive_cumsum(interleaved)] = 1
        span_number = np.cumsum(span_start) - 1  # global; every row starts on an even (non-noise) span
        is_noise = (span_number & 1).astype(bool)
        row_of_token = np.repeat(np.arange(len(lengths)), lengths)
        sentinel = self._sentinels[(span_number >> 1) - exclusive_cumsum(spans)[row_of_token]]
        first = span_start.astype(bool)

        # Inputs keep non-noise tokens; the first token of each noise span becomes its sentinel.
        inputs = np.where(first & is_noise, sentinel, tokens)[~is_noise | first]
        # Targets keep noise tokens; the first token of each non-noise span becomes the next sentinel.
        targets = np.where(first & ~is_noise, sentinel, tokens)[is_noise | first]
        return (
            _append_per_row(inputs, lengths - noise + spans, self._eos),
            _append_per_row(targets, noise + spans, self._eos),
        )


def _random_segmentation(rng: np.random.Generator, items: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Flat lengths of ``segments[r]`` non-empty parts summing to ``items[r]``, every composition equally likely.

    Like T5's ``_random_segmentation``: the ``segments - 1`` cut points are a uniform subset of the
    ``items - 1`` gaps between items.
    """
    cuts = choose_distinct(rng, items - 1, segments - 1)
    row_of_cut = np.repeat(np.arange(len(items)), segments - 1)
    item_offsets = exclusive_cumsum(items)
    cuts = np.sort(item_offsets[row_of_cut] + cuts + 1)  # global index of the first item after each cut
    starts = np.empty(int(segments.sum()), dtype=np.int64)
    is_row_start = np.zeros(len(starts), dtype=bool)
    is_row_start[exclusive_cumsum(segments)] = True
    starts[is_row_start] = item_offsets
    starts[~is_row_start] = cuts
    ends = np.append(starts[1:], item_offsets[-1] + items[-1])
    return ends - starts


def _append_per_row(flat: np.ndarray, counts: np.ndarray, value: int) -> np.ndarray:
    """Insert ``value`` after each row of ``flat`` (row sizes ``counts``)."""
    out = np.empty(len(flat) + len(counts), dtype=np.int64)
    ends = np.cumsum(counts + 1) - 1
    is_end = np.zeros(len(out), dtype=bool)
    is_end[ends] = True
    out[is_end] = value
    out[~is_end] = flat
    return out
