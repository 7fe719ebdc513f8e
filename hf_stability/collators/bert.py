"""BERT masked-language-model collator with Google's exact prediction count, fast.

``transformers.DataCollatorForLanguageModeling`` draws each token independently (so the number of
predictions per row varies), may insert special tokens as "random" replacements and pads through
``tokenizer.pad``. This collator follows google-research/bert ``create_masked_lm_predictions``
instead, and does it with a handful of ``numpy`` operations per batch (no per-token Python loop).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hf_stability.collators._common import (
    IGNORE_INDEX,
    SeededRandomness,
    check_probability,
    check_tokenizer,
    flat_input_ids,
    input_id_arrays,
    pad_flat,
    padded_length,
    require_token_id,
    special_token_ids,
    to_tensors,
    vocab_size,
)

_MASKING_MODES = ("exact", "bernoulli")
# A sort key / size larger than any real one: ineligible units sort last and never fit a budget.
_NEVER = np.iinfo(np.int64).max // 4


@dataclass
class DataCollatorForBertPretraining:
    """Masked-LM (and NSP pass-through) batches for ``BertForPreTraining`` / ``BertForMaskedLM``.

    Which positions are predicted:

    * ``masking="exact"`` (Google): each row predicts exactly
      ``min(max_predictions, max(1, round(n * mlm_probability)))`` tokens, where ``n`` is the row's
      length including ``[CLS]``/``[SEP]`` but not padding. ``round`` is Python 3's round-half-to-even,
      exactly as in Google's ``create_pretraining_data.py`` under Python 3: ``n=30`` gives ``round(4.5) = 4``
      and ``n=50`` gives ``round(7.5) = 8``. A row with fewer candidates predicts all of them. With
      ``mlm_probability=0`` nothing is predicted (Google's ``max(1, ·)`` would still predict one).
    * ``masking="bernoulli"`` (``transformers``): each candidate (each word, with
      ``whole_word_mask``) is chosen independently with probability ``mlm_probability``;
      ``max_predictions`` caps the count (a random subset is kept).

    Candidates are all tokens except the tokenizer's special tokens (Google excludes only
    ``[CLS]``/``[SEP]``; we never touch any special token, ``[PAD]``/``[MASK]``/``[UNK]`` included).
    Each chosen position independently becomes ``[MASK]`` with ``mask_replace_prob``, a random
    *non-special* vocabulary token with ``random_replace_prob``, and stays unchanged otherwise.

    ``whole_word_mask=True`` chooses words instead of tokens. A word is a token plus its following
    continuation tokens (``##…`` for WordPiece), or, when the features carry ``word_ids`` (as
    ``BatchEncoding.word_ids()`` gives them, ``None`` for special tokens), the tokens sharing a word id.
    Like Google, words are visited in random order and a word is taken whole if it still fits the
    row's count, otherwise skipped, so the count is met exactly unless no remaining word fits; each
    token of a chosen word still gets its own mask/random/keep draw (Google decides per token).
    Unlike Google, a continuation token right after ``[SEP]`` starts a new word instead of joining
    the word before the separator. With the ``Trainer``, keep a ``word_ids`` column alive with
    ``remove_unused_columns=False`` (and then drop columns the model does not take yourself).

    Returns ``input_ids``, ``attention_mask``, ``labels`` (the original id at predicted positions,
    -100 elsewhere, padding included) and, when every feature has them, ``token_type_ids`` (padded
    with 0) and ``next_sentence_label`` (shape ``[batch]``). Other feature keys are ignored. Pads that
    are already in ``input_ids`` (pre-padded datasets) do not count towards ``n``.

    Example:
        >>> collator = DataCollatorForBertPretraining(tokenizer, seed=0)  # doctest: +SKIP
        >>> batch = collator([{"input_ids": ids} for ids in tokenizer(texts).input_ids])  # doctest: +SKIP
    """

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    masking: Literal["exact", "bernoulli"] = "exact"
    max_predictions: int | None = None
    whole_word_mask: bool = False
    pad_to_multiple_of: int | None = None
    seed: int | None = None

    _randomness: SeededRandomness = field(init=False, repr=False, compare=False)
    _is_special: np.ndarray = field(init=False, repr=False, compare=False)
    _replacement_ids: np.ndarray = field(init=False, repr=False, compare=False)
    _is_continuation: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_tokenizer(self.tokenizer)
        objective = "BERT masked-language-model pre-training"
        self._mask_id = require_token_id(self.tokenizer, "mask_token_id", objective)
        self._pad_id = require_token_id(self.tokenizer, "pad_token_id", objective)
        require_token_id(self.tokenizer, "cls_token_id", objective)
        require_token_id(self.tokenizer, "sep_token_id", objective)
        self.mlm_probability = check_probability("mlm_probability", self.mlm_probability)
        self.mask_replace_prob = check_probability("mask_replace_prob", self.mask_replace_prob)
        self.random_replace_prob = check_probability("random_replace_prob", self.random_replace_prob)
        if self.mask_replace_prob + self.random_replace_prob > 1 + 1e-12:
            raise ValueError(
                "`mask_replace_prob` + `random_replace_prob` must not exceed 1 (the rest stays unchanged), got "
                f"{self.mask_replace_prob} + {self.random_replace_prob}."
            )
        if self.masking not in _MASKING_MODES:
            raise ValueError(f"`masking` must be one of {_MASKING_MODES}, got {self.masking!r}.")
        if self.max_predictions is not None and (
            not isinstance(self.max_predictions, int)
            or isinstance(self.max_predictions, bool)
            or self.max_predictions < 1
        ):
            raise ValueError(f"`max_predictions` must be an int >= 1 or None, got {self.max_predictions!r}.")
        if not isinstance(self.whole_word_mask, bool):
            raise TypeError(f"`whole_word_mask` must be a bool, got {type(self.whole_word_mask).__name__}.")
        padded_length(1, self.pad_to_multiple_of)  # validates pad_to_multiple_of
        self._randomness = SeededRandomness(self.seed)

        size = vocab_size(self.tokenizer)
        self._is_special = np.zeros(size, dtype=bool)
        self._is_special[special_token_ids(self.tokenizer)] = True
        self._replacement_ids = np.flatnonzero(~self._is_special)
        if self.random_replace_prob > 0 and self._replacement_ids.size == 0:
            raise ValueError("`random_replace_prob` > 0 but the tokenizer has no non-special token to sample.")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        flat, lengths = flat_input_ids(features, self._is_special.size)
        ids, real = pad_flat(flat, lengths, self._pad_id, self.pad_to_multiple_of)
        rng = self._randomness.generator()
        candidate = real & ~self._is_special[ids]
        attended = real & (ids != self._pad_id)  # pads already inside the features count as padding
        budget = self._budget(attended.sum(axis=1))

        if self.whole_word_mask:
            chosen = self._choose_words(features, ids, candidate, budget, rng)
        else:
            eligible = candidate
            if self.masking == "bernoulli":
                eligible = candidate & (rng.random(ids.shape) < self.mlm_probability)
            chosen = eligible if budget is None else _smallest_keys(eligible, budget, rng)

        batch = {"input_ids": self._corrupt(ids, chosen, rng), "attention_mask": attended.astype(np.int64)}
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[chosen] = ids[chosen]
        batch["labels"] = labels
        batch.update(_pass_through(features, lengths, real))
        return to_tensors(batch)

    def _budget(self, lengths: np.ndarray) -> np.ndarray | None:
        """Predictions allowed per row (``lengths`` = unpadded row lengths), ``None`` = no limit."""
        if self.masking == "bernoulli":
            if self.max_predictions is None:
                return None
            return np.full(len(lengths), self.max_predictions, dtype=np.int64)
        if self.mlm_probability == 0:
            return np.zeros(len(lengths), dtype=np.int64)
        # np.rint rounds half to even on the same float64 product, i.e. Python 3's round().
        budget = np.maximum(1, np.rint(lengths * float(self.mlm_probability)).astype(np.int64))
        if self.max_predictions is not None:
            budget = np.minimum(budget, self.max_predictions)
        return budget

    def _choose_words(
        self,
        features: Sequence[Mapping[str, Any]],
        ids: np.ndarray,
        candidate: np.ndarray,
        budget: np.ndarray | None,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Whole-word choice: number the words per row, choose among words, expand back to tokens."""
        word_start = candidate & ~_shift_right(candidate, fill=False)  # first candidate after a special token
        word_ids = _word_id_array(features, ids.shape)
        if word_ids is None:
            word_start |= candidate & ~self._continuation_table()[ids]
        else:
            word_start |= candidate & ((word_ids != _shift_right(word_ids, fill=-1)) | (word_ids < 0))
        word_of_token = np.cumsum(word_start, axis=1) - 1
        width = max(int(word_start.sum(axis=1).max(initial=0)), 1)
        flat_word = (np.arange(len(ids))[:, None] * width + word_of_token)[candidate]
        word_sizes = np.bincount(flat_word, minlength=len(ids) * width).reshape(len(ids), width)
        eligible = word_sizes > 0
        if self.masking == "bernoulli":
            eligible &= rng.random(eligible.shape) < self.mlm_probability
        chosen_words = eligible if budget is None else _fill_budget(word_sizes, eligible, budget, rng)
        return candidate & np.take_along_axis(chosen_words, np.maximum(word_of_token, 0), axis=1)

    def _continuation_table(self) -> np.ndarray:
        """``table[id]`` is True for tokens that continue the previous token's word (``##…``)."""
        if self._is_continuation is None:
            model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
            prefix = getattr(model, "continuing_subword_prefix", None) or "##"
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(self._is_special.size)))
            table = np.fromiter((t is not None and t.startswith(prefix) for t in tokens), dtype=bool, count=len(tokens))
            self._is_continuation = table & ~self._is_special
        if not self._is_continuation.any():
            raise ValueError(
                "`whole_word_mask=True` but the tokenizer has no continuation (`##`) tokens to find words with; "
                "add a `word_ids` list to each feature (e.g. from `BatchEncoding.word_ids()`)."
            )
        return self._is_continuation

    def _corrupt(self, ids: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply the mask / random / keep decision to each chosen position."""
        inputs = ids.copy()
        positions = np.flatnonzero(chosen)
        draw = rng.random(positions.size)
        inputs.flat[positions[draw < self.mask_replace_prob]] = self._mask_id
        keep_from = self.mask_replace_prob + self.random_replace_prob
        replaced = positions[(draw >= self.mask_replace_prob) & (draw < keep_from)]
        if replaced.size:
            inputs.flat[replaced] = self._replacement_ids[rng.integers(0, self._replacement_ids.size, replaced.size)]
        return inputs


def _smallest_keys(eligible: np.ndarray, budget: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ``budget[i]``-subset of each row's eligible tokens (all of them if fewer).

    Single tokens make Google's greedy a plain "first ``budget`` of a shuffle": give every token a
    random key and keep the keys up to the row's ``budget``-th smallest (a sort, no index shuffling).
    """
    keys = rng.random(eligible.shape)
    keys[~eligible] = 2.0
    kth = np.sort(keys, axis=1)[np.arange(len(keys)), np.clip(budget - 1, 0, keys.shape[1] - 1)]
    return eligible & (keys <= kth[:, None]) & (budget > 0)[:, None]


def _fill_budget(sizes: np.ndarray, eligible: np.ndarray, budget: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Google's greedy choice, vectorised over rows: visit eligible units (tokens or words, ``sizes``
    tokens each) in random order and take a unit when it still fits the row's ``budget``, else skip it.

    Up to the first unit that does not fit, this is a prefix of the shuffled order; after it only
    units no larger than the remaining budget can be taken. So each round takes the prefix of the
    remaining fitting units, and since the budget left after a round is smaller than the unit that
    stopped it, the loop runs at most ``1 + largest word length`` rounds.
    """
    keys = rng.random(sizes.shape)
    keys[~eligible] = 2.0  # sort after every eligible unit
    order = np.argsort(keys, axis=1)
    ordered_sizes = np.take_along_axis(np.where(eligible, sizes, _NEVER), order, axis=1)
    taken = np.zeros(sizes.shape, dtype=bool)
    left = budget.astype(np.int64).copy()
    first_unvisited = np.zeros(len(sizes), dtype=np.int64)
    columns = np.arange(sizes.shape[1])
    while True:
        fits = (columns >= first_unvisited[:, None]) & (ordered_sizes <= left[:, None])
        if not fits.any():
            break
        running = np.cumsum(np.where(fits, ordered_sizes, 0), axis=1)
        take = fits & (running <= left[:, None])
        taken |= take
        left -= np.where(take, ordered_sizes, 0).sum(axis=1)
        stopped = fits & ~take
        first_unvisited = np.where(stopped.any(axis=1), stopped.argmax(axis=1) + 1, sizes.shape[1])
    chosen = np.zeros_like(taken)
    np.put_along_axis(chosen, order, taken, axis=1)
    return chosen


def _shift_right(array: np.ndarray, fill: Any) -> np.ndarray:
    """``out[:, t] = array[:, t - 1]``, with ``fill`` in the first column."""
    out = np.empty_like(array)
    out[:, 0] = fill
    out[:, 1:] = array[:, :-1]
    return out


def _word_id_array(features: Sequence[Mapping[str, Any]], shape: tuple[int, int]) -> np.ndarray | None:
    """Features' ``word_ids`` as one padded array (-1 for ``None`` and padding), or None if absent."""
    present = ["word_ids" in feature for feature in features]
    if not any(present):
        return None
    if not all(present):
        raise ValueError("`word_ids` must be given for every feature or for none.")
    out = np.full(shape, -1, dtype=np.int64)
    for index, feature in enumerate(features):
        try:
            # float conversion turns None into NaN in C, avoiding a per-token Python loop.
            values = np.asarray(feature["word_ids"], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"`features[{index}]['word_ids']` must be a list of ints and None.") from error
        if values.ndim != 1 or len(values) != len(feature["input_ids"]):
            raise ValueError(f"`features[{index}]['word_ids']` must have one entry per input id.")
        out[index, : len(values)] = np.nan_to_num(values, nan=-1.0).astype(np.int64)
    return out


def _pass_through(
    features: Sequence[Mapping[str, Any]], lengths: np.ndarray, real: np.ndarray
) -> dict[str, np.ndarray]:
    """``token_type_ids`` (padded with 0) and ``next_sentence_label`` when every feature carries them."""
    out: dict[str, np.ndarray] = {}
    for key in ("token_type_ids", "next_sentence_label"):
        present = [key in feature for feature in features]
        if any(present) and not all(present):
            raise ValueError(f"`{key}` must be given for every feature or for none.")
    if "token_type_ids" in features[0]:
        types = input_id_arrays(features, "token_type_ids")
        for index, (length, row_types) in enumerate(zip(lengths, types, strict=True)):
            if length != len(row_types):
                raise ValueError(f"`features[{index}]['token_type_ids']` must have one entry per input id.")
        out["token_type_ids"] = np.zeros(real.shape, dtype=np.int64)
        out["token_type_ids"][real] = np.concatenate(types)
    if "next_sentence_label" in features[0]:
        try:
            out["next_sentence_label"] = np.array([int(f["next_sentence_label"]) for f in features], dtype=np.int64)
        except (TypeError, ValueError) as error:
            raise TypeError("`next_sentence_label` must be an int (0 = IsNext, 1 = NotNext) per feature.") from error
    return out
