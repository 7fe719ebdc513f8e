"""Next-sentence-prediction datasets: ``[CLS] A [SEP] B [SEP]`` examples, built the way google-research/bert does.

This builds examples once, before training (a list, or a ``datasets.Dataset`` through ``map``); the
collators in :mod:`hf_stability.collators` build batches from them. Both functions are re-exported there.

``create_instances_from_document`` in ``create_pretraining_data.py`` packs consecutive sentences
into a chunk close to the target length, splits it at a random sentence boundary into A and B,
and half the time swaps B for a run of sentences from another document ("NotNext"), putting the
unused sentences back so they start the next chunk. ``transformers`` has no equivalent; this module
reproduces that procedure (including the order of its random draws) on token ids. Masking is left
to :class:`~hf_stability.collators.DataCollatorForBertPretraining` at batch time, so every epoch
sees fresh masks (Google's ``dupe_factor`` copies are not needed).

Seeds of ``Dataset.map`` batches (:func:`nsp_rows`, used by :func:`nsp_dataset` and the BERT recipe): each
batch draws from ``random.Random`` seeded with ``SeedSequence([seed, crc32 of the batch's texts])``, so its
examples depend only on ``seed`` and the documents in it — not on the worker that runs it. The same
``batch_size`` and ``num_proc`` therefore reproduce the same examples; another ``num_proc`` moves batch
boundaries (each worker batches its own shard) and so draws differently.
"""

from __future__ import annotations

import functools
import random
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from hf_stability._extras import require
from hf_stability.collators._common import check_probability, check_tokenizer, require_token_id, vocab_size
from hf_stability.corpus import split_sentences

if TYPE_CHECKING:
    from datasets import Dataset

_OBJECTIVE = "next sentence prediction ([CLS] A [SEP] B [SEP])"
# transformers uses ~1e30 as "no limit" for model_max_length; anything this large is not a real limit.
_NO_REAL_LIMIT = 10**9
_PROGRESS_FROM = 1000  # documents; below this a progress bar is noise
_RANDOM_DOCUMENT_TRIES = 10  # as in Google's code
# Output columns of nsp_dataset; all are lists of ids but the label.
_COLUMN_TYPES = {"input_ids": "int32", "token_type_ids": "int8", "next_sentence_label": "int8"}

TokenDocument = list[list[int]]


def create_nsp_examples(
    documents: Sequence[Sequence[str | Sequence[int]]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    nsp_probability: float = 0.5,
    seed: int | None = None,
    *,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Build ``[CLS] A [SEP] B [SEP]`` examples from documents made of sentences (Google's algorithm).

    Args:
        documents: a list of documents, each a list of sentences; a sentence is a ``str`` (tokenized
            here without special tokens) or a list of token ids. Empty sentences and documents are
            dropped, as Google drops them.
        tokenizer: supplies ``[CLS]``/``[SEP]`` and tokenizes string sentences.
        max_seq_length: hard limit on ``len(input_ids)``; A and B share ``max_seq_length - 3`` tokens.
        short_seq_prob: per document, the probability that its target length is drawn uniformly
            from ``[2, max_seq_length - 3]`` instead of the maximum (fewer train/test length mismatches).
        nsp_probability: probability that B is replaced by text from another document (NotNext) when
            the chunk has a real continuation. A chunk of a single sentence always gets a random B,
            as in Google's code, so the overall NotNext share is slightly above this value.
        seed: seed of the ``random.Random`` that drives every draw (``None``: fresh entropy).
        progress: show a progress bar; by default only for 1,000 documents or more.

    Returns:
        One dict per example, in document order: ``input_ids``, ``token_type_ids`` (0 for
        ``[CLS] A [SEP]``, 1 for ``B [SEP]``) and ``next_sentence_label`` (0 = IsNext, 1 = NotNext,
        the ``BertForPreTraining`` convention).
    """
    cls_id, sep_id = _check_arguments(tokenizer, max_seq_length, short_seq_prob, nsp_probability, seed)
    if isinstance(documents, (str, Mapping)) or not isinstance(documents, Sequence):
        raise TypeError(
            f"`documents` must be a list of documents (lists of sentences), got {type(documents).__name__}."
        )
    if len(documents) == 0:
        raise ValueError("`documents` is empty: next sentence prediction needs at least one document.")
    token_documents = _tokenize_documents(documents, tokenizer)
    if not token_documents:
        raise ValueError("`documents` contain no tokens: every document or sentence is empty.")
    if progress is None:
        progress = len(token_documents) >= _PROGRESS_FROM
    rng = random.Random(seed)
    return _build_examples(
        token_documents, cls_id, sep_id, max_seq_length, short_seq_prob, nsp_probability, rng, progress
    )


def nsp_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    nsp_probability: float = 0.5,
    seed: int | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> Dataset:
    """NSP examples from a ``datasets.Dataset`` with one document (a text) per row.

    Documents are split into sentences with :func:`hf_stability.corpus.split_sentences` and fed to
    :func:`create_nsp_examples` through ``Dataset.map(batched=True)``, so the work runs in parallel
    with ``num_proc`` and is cached like any ``map``. NotNext partners are drawn from the documents
    of the same map batch (``batch_size`` documents, 1,000 by default), not from the whole dataset;
    keep batches large enough to be topically varied. With ``seed`` set, the same ``batch_size`` and
    ``num_proc`` reproduce the same examples (see the module docstring for the seed of each batch).

    Returns a dataset with columns ``input_ids``, ``token_type_ids``, ``next_sentence_label``.
    """
    datasets = require("datasets", "recipes", "nsp_dataset")  # the collators themselves do not need it
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"`dataset` must be a datasets.Dataset, got {type(dataset).__name__}.")
    if text_column not in dataset.column_names:
        raise ValueError(f"`text_column` {text_column!r} is not a column of `dataset` ({dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty: next sentence prediction needs at least one document.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
    return dataset.map(
        nsp_rows(tokenizer, text_column, max_seq_length, short_seq_prob, nsp_probability, seed),
        batched=True,
        batch_size=batch_size,
        remove_columns=dataset.column_names,
        features=datasets.Features(
            {
                name: datasets.Value(dtype) if name == "next_sentence_label" else datasets.List(datasets.Value(dtype))
                for name, dtype in _COLUMN_TYPES.items()
            }
        ),
        num_proc=num_proc,
        load_from_cache_file=seed is not None,  # unseeded runs must not replay an earlier draw
        desc="NSP examples",
    )


def nsp_rows(
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    nsp_probability: float = 0.5,
    seed: int | None = None,
) -> Callable[[Mapping[str, list[Any]]], dict[str, list[Any]]]:
    """The batched ``Dataset.map`` function behind :func:`nsp_dataset`: a batch of texts → NSP example columns.

    For pipelines that do their own ``map`` (streams included); arguments are checked here, once.
    """
    _check_arguments(tokenizer, max_seq_length, short_seq_prob, nsp_probability, seed)
    return functools.partial(
        _nsp_batch,
        tokenizer=tokenizer,
        text_column=text_column,
        max_seq_length=max_seq_length,
        short_seq_prob=short_seq_prob,
        nsp_probability=nsp_probability,
        seed=seed,
    )


def _nsp_batch(
    batch: Mapping[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    max_seq_length: int,
    short_seq_prob: float,
    nsp_probability: float,
    seed: int | None,
) -> dict[str, list[Any]]:
    for text in batch[text_column]:
        if text is not None and not isinstance(text, str):
            raise TypeError(f"`{text_column}` must hold strings, got {type(text).__name__}: {text!r:.40}.")
    texts = [text or "" for text in batch[text_column]]
    token_documents = _tokenize_documents([split_sentences(text) for text in texts], tokenizer)
    batch_seed = None
    if seed is not None:
        batch_seed = int(np.random.SeedSequence([seed, zlib.crc32("\0".join(texts).encode())]).generate_state(1)[0])
    examples = _build_examples(
        token_documents,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        max_seq_length,
        short_seq_prob,
        nsp_probability,
        random.Random(batch_seed),
        progress=False,
    )
    return {key: [example[key] for example in examples] for key in _COLUMN_TYPES}


def _check_arguments(
    tokenizer: Any, max_seq_length: Any, short_seq_prob: Any, nsp_probability: Any, seed: Any
) -> tuple[int, int]:
    """Validate everything but the documents; return the ``[CLS]`` and ``[SEP]`` ids."""
    check_tokenizer(tokenizer)
    cls_id = require_token_id(tokenizer, "cls_token_id", _OBJECTIVE)
    sep_id = require_token_id(tokenizer, "sep_token_id", _OBJECTIVE)
    if not isinstance(max_seq_length, int) or isinstance(max_seq_length, bool) or max_seq_length < 5:
        raise ValueError(
            f"`max_seq_length` must be an int >= 5 ([CLS], [SEP], [SEP] and one token each for A and B), "
            f"got {max_seq_length!r}."
        )
    model_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_limit, int) and model_limit < _NO_REAL_LIMIT and max_seq_length > model_limit:
        raise ValueError(
            f"`max_seq_length`={max_seq_length} exceeds the tokenizer's model_max_length={model_limit} "
            "(the model's position embeddings would not cover it)."
        )
    check_probability("short_seq_prob", short_seq_prob)
    check_probability("nsp_probability", nsp_probability)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"`seed` must be a non-negative int or None, got {seed!r}.")
    return cls_id, sep_id


def _tokenize_documents(
    documents: Sequence[Sequence[str | Sequence[int]]], tokenizer: PreTrainedTokenizerBase
) -> list[TokenDocument]:
    """Token ids per sentence per document; string sentences are tokenized in one batched call."""
    texts: list[str] = []
    text_slots: list[tuple[int, int]] = []
    token_documents: list[list[list[int] | None]] = []
    limit = vocab_size(tokenizer)
    for doc_index, document in enumerate(documents):
        if isinstance(document, (str, Mapping)) or not isinstance(document, Sequence):
            raise TypeError(
                f"`documents[{doc_index}]` must be a list of sentences, got {type(document).__name__}; "
                "split texts with hf_stability.corpus.split_sentences first."
            )
        sentences: list[list[int] | None] = []
        for sentence_index, sentence in enumerate(document):
            if isinstance(sentence, str):
                texts.append(sentence)
                text_slots.append((doc_index, sentence_index))
                sentences.append(None)
                continue
            ids = np.asarray(sentence)
            if ids.ndim != 1 or not (ids.dtype.kind in "iu" or ids.size == 0):
                raise TypeError(
                    f"`documents[{doc_index}][{sentence_index}]` must be a str or a list of token ids, "
                    f"got {type(sentence).__name__}."
                )
            if ids.size and (ids.min() < 0 or ids.max() >= limit):
                raise ValueError(
                    f"`documents[{doc_index}][{sentence_index}]` has token ids outside the tokenizer's "
                    f"vocabulary [0, {limit})."
                )
            sentences.append(ids.tolist())
        token_documents.append(sentences)
    if texts:
        for (doc_index, sentence_index), ids in zip(
            text_slots, tokenizer(texts, add_special_tokens=False)["input_ids"], strict=True
        ):
            token_documents[doc_index][sentence_index] = ids
    non_empty = ([s for s in document if s] for document in token_documents)
    return [document for document in non_empty if document]


def _build_examples(
    documents: list[TokenDocument],
    cls_id: int,
    sep_id: int,
    max_seq_length: int,
    short_seq_prob: float,
    nsp_probability: float,
    rng: random.Random,
    progress: bool,
) -> list[dict[str, Any]]:
    if len(documents) == 1:
        warnings.warn("Only one non-empty document: NotNext segments will come from the same document.", stacklevel=3)
    examples: list[dict[str, Any]] = []
    for index in tqdm(range(len(documents)), desc="NSP examples", unit="doc", disable=not progress):
        for tokens_a, tokens_b, is_random_next in _pairs_from_document(
            documents, index, max_seq_length - 3, short_seq_prob, nsp_probability, rng
        ):
            examples.append(
                {
                    "input_ids": [cls_id, *tokens_a, sep_id, *tokens_b, sep_id],
                    "token_type_ids": [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1),
                    "next_sentence_label": int(is_random_next),
                }
            )
    return examples


def _pairs_from_document(
    documents: list[TokenDocument],
    document_index: int,
    max_num_tokens: int,
    short_seq_prob: float,
    nsp_probability: float,
    rng: random.Random,
) -> list[tuple[list[int], list[int], bool]]:
    """Google's ``create_instances_from_document`` without the masking: (A, B, is_random_next) triples."""
    document = documents[document_index]
    # Usually fill the whole sequence; sometimes aim shorter so pre-training also sees short inputs.
    target_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_length = rng.randint(2, max_num_tokens)

    pairs = []
    chunk: list[list[int]] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [token for sentence in chunk[:a_end] for token in sentence]
            tokens_b: list[int] = []
            is_random_next = len(chunk) == 1 or rng.random() < nsp_probability
            if is_random_next:
                target_b_length = target_length - len(tokens_a)
                for _ in range(_RANDOM_DOCUMENT_TRIES):
                    random_index = rng.randint(0, len(documents) - 1)
                    if random_index != document_index:
                        break
                random_document = documents[random_index]
                for sentence in random_document[rng.randint(0, len(random_document) - 1) :]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_b_length:
                        break
                i -= len(chunk) - a_end  # put the unused sentences back for the next chunk
            else:
                tokens_b = [token for sentence in chunk[a_end:] for token in sentence]
            _truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
            pairs.append((tokens_a, tokens_b, is_random_next))
            chunk = []
            chunk_length = 0
        i += 1
    return pairs


def _truncate_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: random.Random) -> None:
    """Trim the longer of A/B one token at a time, from the front or the back at random (in place)."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
