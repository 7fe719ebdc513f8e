"""BART denoising, as fairseq's ``DenoisingDataset`` does it (Lewis et al. 2020), for a whole batch at once.

Order per row ``bos … eos`` (bos and eos never move and are never masked):

1. sentence permutation: ``ceil(n_sentences * permute_sentence_ratio)`` sentences swap places; a sentence
   ends at a full-stop token, and the text before eos counts as one;
2. masking / infilling: ``ceil(n_words * mask_ratio)`` words are covered by spans that start at random word
   starts; span lengths (in words) are Poisson(``poisson_lambda``) draws cut to that budget (or 1 with
   ``mask_length="word"``/``"subword"``); a zero-length span inserts a ``<mask>``; ``replace_length`` 1 puts
   one ``<mask>`` per span, 0 deletes the span, -1 masks every token; a ``random_ratio`` share of spans
   gets random (non-special) tokens instead. Spans may overlap, as in fairseq, so slightly fewer than
   ``mask_ratio`` of the words end up covered;
3. insertion: ``ceil(length * insert_ratio)`` extra tokens (``<mask>``, ``random_ratio`` of them random);
4. rotation: with probability ``rotate_ratio`` the row (between bos and eos) starts at a random token.

Word starts and sentence ends follow fairseq's GPT-2 setup: a word starts at a token its vocabulary marks as
a word start (``Ġ…``), so a row's first token, which has no marker when the text did not begin with a space,
is never masked and does not count towards the budget (``first_token_starts_word=True`` counts it); only the
token that reads exactly ``"."`` ends a sentence, not ``"Ġ."`` (``full_stop_token_ids`` chooses others).

The BART paper's ablations are one switch each: token masking = ``mask_length="subword"``, token deletion =
``mask_length="subword", replace_length=0``, text infilling = the defaults, sentence permutation =
``permute_sentence_ratio``, document rotation = ``rotate_ratio``; set the others to 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hf_stability.collators._common import (
    SeededRandomness,
    as_number,
    check_probability,
    check_tokenizer,
    flat_input_ids,
    require_token_id,
    seq2seq_batch,
)
from hf_stability.collators._ragged import choose_distinct, exclusive_cumsum

OBJECTIVE = "BART denoising"
MASK_LENGTHS = ("span-poisson", "word", "subword")
# Word-start markers of the common subword schemes: byte-level BPE (GPT-2/BART/RoBERTa) and SentencePiece.
_WORD_START_MARKERS = ("\u0120", "\u2581")
# fairseq's span-length table stops after the first Poisson term below this probability.
NEGLIGIBLE = 1e-7
# The Poisson rates whose table gives span lengths above 0 at least that probability (see `check_poisson_lambda`).
POISSON_LAMBDA_RANGE = (NEGLIGIBLE / (1 - NEGLIGIBLE), math.log(1 / NEGLIGIBLE))


@dataclass
class DataCollatorForBartDenoising:
    """Corrupt ``bos … eos`` rows with BART's noising functions; the model learns to restore the original.

    Args:
        tokenizer: needs ``bos``, ``eos``, ``pad`` and (when masking or inserting) ``mask`` tokens.
        mask_ratio: share of words to mask (fairseq ``--mask``); 0 switches masking off.
        random_ratio: share of masks that become random non-special tokens (``--mask-random``).
        poisson_lambda: mean span length in words for ``mask_length="span-poisson"``; in about
            [1e-7, 16.12] (see `check_poisson_lambda`). Small rates make most spans empty, and each empty span
            inserts a ``<mask>``: about ``exp(-λ) / (1 - exp(-λ))`` of them per span (2.9 at 0.3).
        permute_sentence_ratio: share of each row's sentences that swap places (``--permute-sentences``).
        rotate_ratio: probability that a row is rotated (``--rotate``).
        insert_ratio: extra ``<mask>``/random tokens to insert, as a share of the row length (``--insert``).
        replace_length: 1 = one ``<mask>`` per span, 0 = delete spans, -1 = mask every token.
        decoder_start_token_id: first decoder input; ``None`` uses eos, BART's convention.
        pad_to_multiple_of: round the padded widths up to a multiple of this.
        seed: fixes the noise (see ``SeededRandomness``); ``None`` follows torch's global seed.
        mask_length: ``"span-poisson"`` (text infilling), ``"word"`` (whole words) or ``"subword"`` (tokens).
        full_stop_token_ids: ids that end a sentence; by default the token that reads exactly ``"."``, as
            fairseq's GPT-2 setup (``vocab.index('13')``); ``"Ġ."`` (a stop after a space) does not end one.
            Pass both ids to end sentences at either.
        first_token_starts_word: count a token right after ``<s>`` (or another special token) as a word
            start even without a word-start marker. fairseq does not (False): its first word is then never
            masked and the budget counts one word fewer.

    Returns a dict of tensors: ``input_ids`` (noised, padded per batch — insertions make rows longer),
    ``attention_mask``, ``labels`` (the original rows, -100 on padding) and ``decoder_input_ids``.
    """

    tokenizer: PreTrainedTokenizerBase
    mask_ratio: float = 0.3
    random_ratio: float = 0.1
    poisson_lambda: float = 3.5
    permute_sentence_ratio: float = 1.0
    rotate_ratio: float = 0.0
    insert_ratio: float = 0.0
    replace_length: int = 1
    decoder_start_token_id: int | None = None
    pad_to_multiple_of: int | None = None
    seed: int | None = None
    mask_length: Literal["span-poisson", "word", "subword"] = "span-poisson"
    full_stop_token_ids: Sequence[int] | None = None
    first_token_starts_word: bool = False
    _randomness: SeededRandomness = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_tokenizer(self.tokenizer)
        for name in ("mask_ratio", "random_ratio", "permute_sentence_ratio", "rotate_ratio", "insert_ratio"):
            setattr(self, name, check_probability(name, getattr(self, name)))
        if self.replace_length not in (-1, 0, 1) or isinstance(self.replace_length, bool):
            raise ValueError(f"`replace_length` must be -1, 0 or 1, got {self.replace_length!r}.")
        if self.mask_length not in MASK_LENGTHS:
            raise ValueError(f"`mask_length` must be one of {MASK_LENGTHS}, got {self.mask_length!r}.")
        if self.mask_length == "subword" and self.replace_length == -1:
            raise ValueError("`replace_length=-1` needs whole words: use `mask_length='word'` or 'span-poisson'.")
        self.poisson_lambda = check_poisson_lambda(self.poisson_lambda)
        if not isinstance(self.first_token_starts_word, bool):
            kind = type(self.first_token_starts_word).__name__
            raise TypeError(f"`first_token_starts_word` must be a bool, got {kind}.")

        self._bos = require_token_id(self.tokenizer, "bos_token_id", OBJECTIVE)
        self._eos = require_token_id(self.tokenizer, "eos_token_id", OBJECTIVE)
        self._pad = require_token_id(self.tokenizer, "pad_token_id", OBJECTIVE)
        if self.mask_ratio > 0 or self.insert_ratio > 0:
            self._mask = require_token_id(self.tokenizer, "mask_token_id", OBJECTIVE)
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self._eos

        tokens = [t or "" for t in self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))]
        special = np.zeros(len(tokens), dtype=bool)
        special[list(self.tokenizer.all_special_ids)] = True
        # Special tokens other than <unk> are walls: never masked, and no span crosses them.
        self._barrier = special.copy()
        if self.tokenizer.unk_token_id is not None:
            self._barrier[self.tokenizer.unk_token_id] = False
        self._word_start = _word_start_table(tokens, special, self.tokenizer.unk_token_id)
        self._full_stop = self._full_stop_table(tokens)
        self._random_pool = np.flatnonzero(~special)
        self._span_cdf = _poisson_cdf(float(self.poisson_lambda))
        self._randomness = SeededRandomness(self.seed)

    def _full_stop_table(self, tokens: list[str]) -> np.ndarray:
        table = np.zeros(len(tokens), dtype=bool)
        if self.full_stop_token_ids is not None:
            ids = np.asarray(list(self.full_stop_token_ids), dtype=np.int64)
            if ids.size == 0 or ids.min() < 0 or ids.max() >= len(tokens):
                raise ValueError(f"`full_stop_token_ids` must be non-empty ids in [0, {len(tokens)}), got {ids}.")
            table[ids] = True
            return table
        table[[i for i, t in enumerate(tokens) if t == "."]] = True
        if self.permute_sentence_ratio > 0 and not table.any():
            raise ValueError(
                "Sentence permutation needs a full-stop token and no token of the tokenizer reads '.': "
                "pass `full_stop_token_ids` or set `permute_sentence_ratio=0`."
            )
        return table

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        original, lengths = flat_input_ids(features, len(self._barrier))
        self._check_rows(original, lengths)
        rng = self._randomness.generator()

        tokens, new_lengths = original, lengths
        if self.permute_sentence_ratio > 0:
            tokens = self._permute_sentences(rng, tokens, new_lengths)
        inserts = np.zeros(len(lengths), dtype=np.int64)
        random_inserts = inserts
        if self.mask_ratio > 0:
            tokens, new_lengths, inserts = self._mask_spans(rng, tokens, new_lengths)
            random_inserts = np.ceil(inserts * self.random_ratio).astype(np.int64)
        if self.insert_ratio > 0:
            # fairseq inserts the zero-length spans' masks, then insert_ratio more: one uniform pass is the same.
            extra = np.ceil((new_lengths + inserts) * self.insert_ratio).astype(np.int64)
            inserts = inserts + extra
            random_inserts = random_inserts + np.ceil(extra * self.random_ratio).astype(np.int64)
        if inserts.any():
            tokens, new_lengths = self._insert(rng, tokens, new_lengths, inserts, random_inserts)
        if self.rotate_ratio > 0:
            tokens = self._rotate(rng, tokens, new_lengths)

        return seq2seq_batch(
            tokens,
            new_lengths,
            original,
            lengths,
            self._pad,
            cast(int, self.decoder_start_token_id),  # set in __post_init__
            self.pad_to_multiple_of,
        )

    def _check_rows(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        short = np.flatnonzero(lengths < 2)
        if len(short):
            raise ValueError(f"`features[{short[0]}]['input_ids']` must hold at least bos and eos.")
        starts = exclusive_cumsum(lengths)
        bad = np.flatnonzero((tokens[starts] != self._bos) | (tokens[starts + lengths - 1] != self._eos))
        if len(bad):
            raise ValueError(
                f"`features[{bad[0]}]['input_ids']` must start with bos ({self._bos}) and end with eos ({self._eos}): "
                "tokenize with `add_special_tokens=True`."
            )

    def _permute_sentences(self, rng: np.random.Generator, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """fairseq ``permute_sentences`` for every row: swap whole sentences, keep bos and the eos tail."""
        starts = exclusive_cumsum(lengths)
        ends = starts + lengths
        full_stop = self._full_stop[tokens]
        full_stop[(ends - 2)[lengths >= 3]] = True  # the text before eos ends a sentence
        # A sentence ends after a full stop whose predecessor is not one (the rest of a run starts the next).
        ends_sentence = full_stop.copy()
        ends_sentence[1:] &= ~full_stop[:-1]
        ends_sentence[starts] = False
        ends_sentence[ends - 1] = False
        begins = np.zeros(len(tokens), dtype=bool)
        begins[starts] = True
        begins[starts + 1] = True
        begins[np.flatnonzero(ends_sentence) + 1] = True

        segment_start = np.flatnonzero(begins)
        segment_length = np.diff(np.append(segment_start, len(tokens)))
        # Per row: segment 0 is bos, the last holds eos, the ones between are sentences.
        segments = np.add.reduceat(begins.astype(np.int64), starts)
        first_segment = exclusive_cumsum(segments)
        sentences = segments - 2
        to_permute = np.ceil(sentences * self.permute_sentence_ratio).astype(np.int64)
        chosen = choose_distinct(rng, sentences, to_permute)
        shuffle = choose_distinct(rng, to_permute, to_permute)
        row = np.repeat(np.arange(len(lengths)), to_permute)
        order = np.arange(len(segment_start))
        offset = first_segment[row] + 1
        order[offset + chosen] = offset + chosen[exclusive_cumsum(to_permute)[row] + shuffle]

        new_length = segment_length[order]
        gather = np.repeat(segment_start[order] - exclusive_cumsum(new_length), new_length) + np.arange(len(tokens))
        return tokens[gather]

    def _mask_spans(
        self, rng: np.random.Generator, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fairseq ``add_whole_word_mask`` for every row; returns tokens, lengths and zero-length spans per row."""
        batch = len(lengths)
        row_of = np.repeat(np.arange(batch), lengths)
        barrier = self._barrier[tokens]
        if self.mask_length == "subword":
            word_start = ~barrier
        else:
            word_start = self._word_start[tokens]
            if self.first_token_starts_word:
                word_start[1:] |= barrier[:-1] & ~barrier[1:]
        words = np.bincount(row_of[word_start], minlength=batch)
        # fairseq: ceil(float32 word count * mask ratio).
        budget = np.ceil(words.astype(np.float32) * np.float32(self.mask_ratio)).astype(np.int64)

        if self.mask_length == "span-poisson":
            span_length, spans, inserts = _draw_span_lengths(rng, budget, self._span_cdf)
        else:
            span_length, spans, inserts = np.ones(int(budget.sum()), dtype=np.int64), budget, np.zeros_like(budget)
        word_position = np.flatnonzero(word_start)
        span_row = np.repeat(np.arange(batch), spans)
        span_start = word_position[exclusive_cumsum(words)[span_row] + choose_distinct(rng, words, spans)]

        # A span of k words ends at the k-th word start after it, or earlier at a special token (eos).
        stops = np.flatnonzero(word_start | barrier)
        stop_index = np.where(barrier[stops], np.arange(len(stops)), len(stops))
        next_barrier = np.minimum.accumulate(stop_index[::-1])[::-1]
        first = np.searchsorted(stops, span_start)
        span_end = stops[np.minimum(first + span_length, next_barrier[first])]

        size = len(tokens) + 1
        covered = np.cumsum(np.bincount(span_start, minlength=size) - np.bincount(span_end, minlength=size))[:-1]
        random_span = rng.random(len(span_start)) < self.random_ratio
        out = tokens.copy()
        if self.replace_length == -1:
            out[covered > 0] = self._mask
            random_start, random_end = span_start[random_span], span_end[random_span]
            random_cover = np.cumsum(
                np.bincount(random_start, minlength=size) - np.bincount(random_end, minlength=size)
            )
            is_random = random_cover[:-1] > 0
            out[is_random] = self._random_tokens(rng, int(is_random.sum()))
            return out, lengths, inserts
        keep = covered == 0
        if self.replace_length == 1:
            # A span start that another span already covers is deleted with that span, as in fairseq.
            own = covered[span_start] == 1
            out[span_start[own]] = self._mask
            random_own = span_start[own & random_span]
            out[random_own] = self._random_tokens(rng, len(random_own))
            keep[span_start[own]] = True
        return out[keep], np.bincount(row_of[keep], minlength=batch), inserts

    def _insert(
        self,
        rng: np.random.Generator,
        tokens: np.ndarray,
        lengths: np.ndarray,
        counts: np.ndarray,
        random_counts: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """fairseq ``add_insertion_noise``: ``counts`` new tokens at uniform positions strictly inside each row."""
        new_lengths = lengths + counts
        position = choose_distinct(rng, new_lengths - 2, counts) + 1
        row = np.repeat(np.arange(len(lengths)), counts)
        flat_position = exclusive_cumsum(new_lengths)[row] + position
        # The picks come in random order, so the first random_counts of a row are a uniform subset.
        is_random = np.arange(len(row)) - exclusive_cumsum(counts)[row] < random_counts[row]
        out = np.empty(int(new_lengths.sum()), dtype=np.int64)
        inserted = np.zeros(len(out), dtype=bool)
        inserted[flat_position] = True
        out[~inserted] = tokens
        out[flat_position] = self._mask
        out[flat_position[is_random]] = self._random_tokens(rng, int(is_random.sum()))
        return out, new_lengths

    def _rotate(self, rng: np.random.Generator, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """fairseq ``add_rolling_noise`` for a ``rotate_ratio`` share of rows: bos, x[o:-1], x[1:o], eos."""
        offset = rng.integers(1, np.maximum(1, lengths - 1) + 1)
        rotated = (rng.random(len(lengths)) < self.rotate_ratio) & (lengths > 2)
        starts = exclusive_cumsum(lengths)
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        column = np.arange(len(tokens)) - starts[row_of]
        inside = rotated[row_of] & (column >= 1) & (column <= lengths[row_of] - 2)
        row = row_of[inside]
        body = lengths[row] - 2
        source = starts[row] + 1 + (column[inside] - 1 + offset[row] - 1) % body
        out = tokens.copy()
        out[inside] = tokens[source]
        return out

    def _random_tokens(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return self._random_pool[rng.integers(0, len(self._random_pool), size=count)]


def _word_start_table(tokens: list[str], special: np.ndarray, unk_token_id: int | None) -> np.ndarray:
    """Which vocabulary entries begin a word (fairseq's ``mask_whole_words``), from the tokenizer's convention.

    WordPiece marks continuations (``##``); byte-level BPE and SentencePiece mark word starts (``Ġ``, ``▁``).
    Punctuation without a marker continues the previous word, exactly as fairseq decides for GPT-2 BPE.
    """
    if any(t.startswith("##") for t in tokens):
        table = np.array([not t.startswith("##") for t in tokens], dtype=bool)
    else:
        counts = [sum(t.startswith(m) for t in tokens) for m in _WORD_START_MARKERS]
        marker = _WORD_START_MARKERS[int(np.argmax(counts))]
        table = np.array([t.startswith(marker) for t in tokens], dtype=bool)
    table[special] = False
    if unk_token_id is not None:
        table[unk_token_id] = True
    return table


def _poisson_cdf(rate: float) -> np.ndarray:
    """CDF of fairseq's span-length distribution: Poisson(rate) cut after the first probability below ``NEGLIGIBLE``."""
    probabilities = []
    for k in range(128):
        log_probability = -rate + k * math.log(rate) - math.lgamma(k + 1)
        probabilities.append(math.exp(log_probability))
        if log_probability < math.log(NEGLIGIBLE):  # in logs, so the cut-off sits exactly at the range's ends
            break
    cdf = np.cumsum(probabilities) / np.sum(probabilities)
    cdf[-1] = 1.0
    return cdf


def check_poisson_lambda(rate: object) -> float:
    """``rate`` as a float if fairseq's span-length table for it gives lengths above 0 a chance, else ``ValueError``.

    fairseq tabulates Poisson(λ) from k = 0 and stops after the first term below ``NEGLIGIBLE`` (1e-7); span
    lengths are drawn until they add up to the masking budget, so if no length above 0 can come out, that
    loop never ends. The chance of a length above 0 must itself not be negligible:

    * large λ: the table stops at k = 0 when ``exp(-λ) < 1e-7``, leaving only length 0; so λ <= ln(1e7) ≈ 16.118;
    * small λ: the table is {0, 1} once ``λ exp(-λ) < 1e-7``, and P(length > 0) = λ / (1 + λ); that is at least
      1e-7 for λ >= 1e-7 / (1 - 1e-7) ≈ 1.0000001e-7.
    """
    low, high = POISSON_LAMBDA_RANGE
    number = as_number("poisson_lambda", rate, f"a number in [{low:.8g}, {high:.6g}]")
    if not low <= number <= high:
        raise ValueError(
            f"`poisson_lambda` must be in [{low:.8g}, {high:.6g}], got {rate!r}: outside it fairseq's span-length "
            "table (Poisson terms down to 1e-7) gives lengths above 0 no real chance, so the masking budget "
            "could never be filled."
        )
    return number


def _draw_span_lengths(
    rng: np.random.Generator, budget: np.ndarray, cdf: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fairseq's span lengths: table draws until they reach the row's word budget, the last one cut to fit.

    Returns the non-zero lengths (flat, grouped by row), their count per row, and the number of zero-length
    draws among them per row (fairseq turns those into inserted masks). Drawn without a loop: the non-zero
    draws come from the table conditioned on > 0 (each at least 1, so ``budget`` of them always suffice),
    and the zeros that precede them, per row, from a negative binomial. That is the same joint distribution
    as drawing one by one, and it cannot spin however rarely a length above 0 comes out.
    """
    batch = len(budget)
    nonzero = 1.0 - cdf[0]
    conditional = (cdf[1:] - cdf[0]) / nonzero
    conditional[-1] = 1.0
    width = max(int(budget.max()), 1)
    draws = np.searchsorted(conditional, rng.random((batch, width)), side="right") + 1
    cumulative = np.cumsum(draws, axis=1)
    last = np.argmax(cumulative >= budget[:, None], axis=1)
    rows = np.arange(batch)
    draws[rows, last] = budget - (cumulative[rows, last] - draws[rows, last])
    spans = np.where(budget > 0, last + 1, 0)
    inserts = np.where(spans > 0, rng.negative_binomial(np.maximum(spans, 1), nonzero), 0)
    return draws[np.arange(width) < spans[:, None]], spans, inserts
