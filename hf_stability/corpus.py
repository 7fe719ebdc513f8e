"""An embedded English corpus and tokenizers trained on the fly.

Everything here runs offline: the corpus is Python's own ``pydoc_data.topics`` (79 documents of
English prose about the language, ~465 kB) and the tokenizers are trained with ``tokenizers`` in a
second or two. Recipes use them as their no-argument default and tests use them to build real
tokenizers without touching the Hub.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TokenizerKind = Literal["bert", "bart", "t5"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_BLANK_LINES = re.compile(r"\n\s*\n")


def default_corpus() -> list[str]:
    """Return the embedded corpus: one string per ``pydoc_data.topics`` document, in a fixed order.

    Paragraphs are separated by a blank line; line breaks inside a paragraph become spaces so that
    sentences are not cut by the source's 70-column wrapping.
    """
    from pydoc_data import topics

    documents = []
    for key in sorted(topics.topics):
        paragraphs = (" ".join(p.split()) for p in _BLANK_LINES.split(topics.topics[key]))
        documents.append("\n\n".join(p for p in paragraphs if p))
    return documents


def split_sentences(text: str) -> list[str]:
    """Split a document into sentences: at paragraph breaks and after ``.``, ``!`` or ``?``.

    Good enough for the embedded corpus and ordinary prose; users with a better splitter (nltk,
    spaCy) can pass their own sentence lists to :func:`hf_stability.collators.create_nsp_examples`.
    """
    sentences: list[str] = []
    for paragraph in _BLANK_LINES.split(text):
        sentences.extend(s for s in (s.strip() for s in _SENTENCE_END.split(" ".join(paragraph.split()))) if s)
    return sentences


def train_tokenizer(
    texts: Iterable[str],
    kind: TokenizerKind,
    vocab_size: int = 2000,
    num_sentinels: int = 100,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer of the family a pre-training objective expects.

    Args:
        texts: training text, e.g. :func:`default_corpus`.
        kind: ``"bert"`` (uncased WordPiece with ``[CLS]``/``[SEP]``/``[MASK]`` and ``##``
            continuations), ``"bart"`` (byte-level BPE with ``<s>``/``</s>``/``<mask>``, adds bos/eos)
            or ``"t5"`` (Unigram with ``</s>`` appended and ``<extra_id_0>``…``<extra_id_{n-1}>``
            sentinels numbered from the end of the vocabulary, as in T5).
        vocab_size: target vocabulary size, special tokens included.
        num_sentinels: number of T5 sentinel tokens (``kind="t5"`` only).
        model_max_length: the model's input length, so that ``truncation=True`` stops there; without it the
            tokenizer knows no limit (``transformers``' 1e30) and truncation needs an explicit ``max_length``.

    Returns:
        A ``PreTrainedTokenizerFast`` with its special tokens set, ready for ``save_pretrained``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("`texts` is empty: a tokenizer needs some training text.")
    if model_max_length is not None and model_max_length < 1:
        raise ValueError(f"`model_max_length` must be >= 1, got {model_max_length}.")
    if kind == "bert":
        tokenizer = _train_bert(texts, vocab_size)
    elif kind == "bart":
        tokenizer = _train_bart(texts, vocab_size)
    elif kind == "t5":
        tokenizer = _train_t5(texts, vocab_size, num_sentinels)
    else:
        raise ValueError(f"`kind` must be 'bert', 'bart' or 't5', got {kind!r}.")
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def _train_bert(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers each `##c` as it first meets it while iterating a hash map of words, whose order changes
    # from process to process, and breaks ties between merges of equal count by those numbers; so the vocabulary
    # (ids, and at the margin the token set) would differ per process. Passing every `##c` the corpus needs in
    # sorted order as a special token numbers them first and fixed; they are then made ordinary vocabulary again.
    continuations = sorted({f"##{c}" for word in _words(tok, texts) for c in word[1:]})
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special + continuations)
    tok.train_from_iterator(texts, trainer)
    tok = _without_added_tokens(tok, set(continuations))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _words(tok: Tokenizer, texts: list[str]) -> set[str]:
    """The distinct words the trainer sees: ``texts`` through ``tok``'s normalizer and pre-tokenizer."""
    normalize = tok.normalizer.normalize_str if tok.normalizer else str
    return {word for text in texts for word, _ in tok.pre_tokenizer.pre_tokenize_str(normalize(text))}


def _without_added_tokens(tok: Tokenizer, tokens: set[str]) -> Tokenizer:
    """``tok`` with ``tokens`` dropped from its added (special) tokens: they stay in the model's vocabulary."""
    data = json.loads(tok.to_str())
    data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] not in tokens]
    return Tokenizer.from_str(json.dumps(data))


def _train_bart(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))],
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def _train_t5(texts: list[str], vocab_size: int, num_sentinels: int) -> PreTrainedTokenizerFast:
    if num_sentinels < 1:
        raise ValueError(f"`num_sentinels` must be >= 1, got {num_sentinels}.")
    special = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=vocab_size - num_sentinels, special_tokens=special, unk_token="<unk>"
        ),
    )
    tok = _canonical_unigram(tok, len(special))
    # T5 numbers its sentinels downwards from the end of the vocabulary: <extra_id_0> is the last id.
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(num_sentinels))]
    tok.add_special_tokens(sentinels)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>",
        pair="$A </s> $B </s>",
        special_tokens=[("</s>", tok.token_to_id("</s>"))],
    )
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(reversed(sentinels)),
    )


# Scores are rounded to this many decimals: far finer than any score difference that matters (they are log
# probabilities), far coarser than the trainer's summation-order noise (below 1e-10).
_SCORE_DECIMALS = 6
# `tokenizers`' Unigram trainer gives the characters it pruned but still needs the scores min, min + 1e-4, …
_CHARACTER_PENALTY = 1e-4


def _canonical_unigram(tok: Tokenizer, num_special: int) -> Tokenizer:
    """``tok``'s trained Unigram model made the same in every process: specials first, then (-score, piece) order.

    The trainer iterates hash maps whose order changes per process: its EM sums the words' expected counts in that
    order (scores differ by ~1e-11) and it hands the penalty scores of the characters it pruned but needs out in
    that order (scores differ by up to 1e-3), so ids and tokenization would differ. Here the penalised characters
    get those scores in sorted order, every score is rounded, and the pieces are renumbered in a fixed order.
    """
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    specials, pieces = vocab[:num_special], sorted(vocab[num_special:], key=lambda entry: entry[1])
    penalised: list[tuple[str, float]] = []
    for piece, score in pieces:  # the lowest scores: min, min (the model's own lowest piece), min + 1e-4, …
        steps = (score - pieces[0][1]) / _CHARACTER_PENALTY
        if steps > len(penalised) + 0.01 or abs(steps - round(steps)) > 0.01:
            break
        if len(piece) == 1:
            penalised.append((piece, score))
    scores = dict(pieces)
    scores.update(zip(sorted(piece for piece, _ in penalised), (score for _, score in penalised), strict=True))
    ordered = sorted(((piece, round(score, _SCORE_DECIMALS)) for piece, score in scores.items()), key=_by_score)
    data["model"]["vocab"] = specials + [list(entry) for entry in ordered]
    return Tokenizer.from_str(json.dumps(data))


def _by_score(entry: tuple[str, float]) -> tuple[float, str]:
    return -entry[1], entry[0]
