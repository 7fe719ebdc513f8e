"""create_nsp_examples / nsp_dataset: Google's NSP layout, provenance of A and B, label balance, seeds, errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from datasets import Dataset

from hf_stability import collators, nsp_examples
from hf_stability.corpus import split_sentences
from hf_stability.nsp_examples import create_nsp_examples, nsp_dataset

# Provenance documents: sentence s of document d is 4 copies of the id BASE + d * SENTENCES + s, so
# every token says where it came from. Truncation trims at most 3 tokens (a chunk overshoots its
# target by less than one 4-token sentence), so no sentence disappears entirely.
BASE, DOCUMENTS, SENTENCES, SENTENCE_LENGTH = 10, 40, 45, 4


def provenance_documents() -> list[list[list[int]]]:
    return [[[BASE + d * SENTENCES + s] * SENTENCE_LENGTH for s in range(SENTENCES)] for d in range(DOCUMENTS)]


def origin(tokens: list[int]) -> list[tuple[int, int]]:
    """(document, sentence) of each distinct sentence in `tokens`, in order."""
    seen: list[tuple[int, int]] = []
    for token in tokens:
        where = divmod(token - BASE, SENTENCES)
        if not seen or seen[-1] != where:
            seen.append(where)
    return seen


def split(example, tokenizer) -> tuple[list[int], list[int]]:
    ids = example["input_ids"]
    first_sep = ids.index(tokenizer.sep_token_id)
    return ids[1:first_sep], ids[first_sep + 1 : -1]


def is_contiguous(sentences: list[tuple[int, int]]) -> bool:
    return len({d for d, _ in sentences}) == 1 and [s for _, s in sentences] == list(
        range(sentences[0][1], sentences[0][1] + len(sentences))
    )


@pytest.fixture(scope="module")
def provenance_examples(bert_tokenizer):
    return create_nsp_examples(provenance_documents(), bert_tokenizer, max_seq_length=64, seed=0)


def test_layout_and_token_types(bert_tokenizer, provenance_examples):
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert len(provenance_examples) > 150
    for example in provenance_examples:
        ids, types = example["input_ids"], example["token_type_ids"]
        assert set(example) == {"input_ids", "token_type_ids", "next_sentence_label"}
        assert len(ids) == len(types) <= 64
        assert ids[0] == cls and ids[-1] == sep and ids.count(sep) == 2 and ids.count(cls) == 1
        a_length = ids.index(sep) - 1
        assert a_length >= 1 and len(ids) - a_length - 3 >= 1
        assert types == [0] * (a_length + 2) + [1] * (len(ids) - a_length - 2)
        assert example["next_sentence_label"] in (0, 1)


def test_is_next_is_the_true_continuation_and_not_next_comes_from_elsewhere(bert_tokenizer, provenance_examples):
    counts = {0: 0, 1: 0}
    used: set[tuple[int, int]] = set()
    for example in provenance_examples:
        tokens_a, tokens_b = split(example, bert_tokenizer)
        a, b = origin(tokens_a), origin(tokens_b)
        assert is_contiguous(a) and is_contiguous(b)
        used.update(a)
        if example["next_sentence_label"] == 0:
            assert is_contiguous(a + b)  # same document, B starts right after A
            used.update(b)
        else:
            assert a[0][0] != b[0][0]  # 40 documents: a same-document draw 10 times in a row is ~1e-16
        counts[example["next_sentence_label"]] += 1
    assert min(counts.values()) > 60
    # The sentences a NotNext chunk did not use are put back, so every sentence ends up in an A or a true B.
    assert used == {(d, s) for d in range(DOCUMENTS) for s in range(SENTENCES)}


@pytest.mark.parametrize("nsp_probability", [0.5, 0.2])
def test_label_balance_follows_nsp_probability(bert_tokenizer, nsp_probability):
    examples = create_nsp_examples(
        provenance_documents(),
        bert_tokenizer,
        max_seq_length=40,
        short_seq_prob=0.0,
        nsp_probability=nsp_probability,
        seed=1,
    )
    # A chunk of one sentence always gets a random B (Google). With full-length targets (no short
    # sequences, whose targets can be below one sentence) that only happens at a document's end, and
    # then A holds the document's last sentence. Every other label is a coin flip.
    labels = [e["next_sentence_label"] for e in examples if origin(split(e, bert_tokenizer)[0])[-1][1] != SENTENCES - 1]
    n = len(labels)  # ~600
    # NotNext count ~ Binomial(n, p): allow 4.5 sigma, sigma = sqrt(p (1 - p) / n) (~0.02 for p=0.5).
    assert abs(np.mean(labels) - nsp_probability) < 4.5 * math.sqrt(nsp_probability * (1 - nsp_probability) / n)


def test_short_seq_prob_gives_shorter_sequences(bert_tokenizer):
    def mean_length(short_seq_prob: float) -> float:
        examples = create_nsp_examples(
            provenance_documents(), bert_tokenizer, max_seq_length=64, short_seq_prob=short_seq_prob, seed=2
        )
        return float(np.mean([len(e["input_ids"]) for e in examples]))

    full, short = mean_length(0.0), mean_length(1.0)
    # Targets uniform on [2, 61] average ~32 tokens against ~61: the mean drops by about half.
    assert full > 55 and short < 0.7 * full


def test_string_sentences_match_pre_tokenized_ids(bert_tokenizer, corpus):
    texts = [split_sentences(doc)[:30] for doc in corpus[:12]]
    as_ids = [[bert_tokenizer(s, add_special_tokens=False).input_ids for s in doc] for doc in texts]
    mixed = [
        [s if j % 2 else ids for j, (s, ids) in enumerate(zip(doc, id_doc, strict=True))]
        for doc, id_doc in zip(texts, as_ids, strict=True)
    ]
    from_text = create_nsp_examples(texts, bert_tokenizer, seed=3)
    assert from_text == create_nsp_examples(as_ids, bert_tokenizer, seed=3)
    assert from_text == create_nsp_examples(mixed, bert_tokenizer, seed=3)
    assert all(len(e["input_ids"]) <= 128 for e in from_text)


def test_seed_reproducibility(bert_tokenizer):
    documents = provenance_documents()
    first = create_nsp_examples(documents, bert_tokenizer, max_seq_length=64, seed=4)
    assert first == create_nsp_examples(documents, bert_tokenizer, max_seq_length=64, seed=4)
    assert first != create_nsp_examples(documents, bert_tokenizer, max_seq_length=64, seed=5)


def test_empty_sentences_and_documents_are_dropped(bert_tokenizer):
    documents = [[], ["", "Alpha beta gamma.", [], "Delta epsilon."], ["  "], ["Zeta eta theta.", "Iota kappa."]]
    examples = create_nsp_examples(documents, bert_tokenizer, seed=0)
    assert examples and all(len(e["input_ids"]) > 4 for e in examples)


def test_single_document_warns(bert_tokenizer):
    with pytest.warns(UserWarning, match="same document"):
        examples = create_nsp_examples([["One sentence here.", "Another sentence there."]], bert_tokenizer, seed=0)
    assert examples


def test_nsp_dataset_on_a_real_dataset(bert_tokenizer, corpus):
    dataset = Dataset.from_dict({"text": corpus[:30], "source": [f"doc{i}" for i in range(30)]})
    result = nsp_dataset(dataset, bert_tokenizer, max_seq_length=96, seed=7, batch_size=10)
    assert isinstance(result, Dataset)
    assert set(result.column_names) == {"input_ids", "token_type_ids", "next_sentence_label"}
    assert len(result) > 100
    labels = result["next_sentence_label"]
    assert 0.3 < np.mean(labels) < 0.7
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    for ids, types in zip(result["input_ids"], result["token_type_ids"], strict=True):
        assert ids[0] == cls and ids[-1] == sep and ids.count(sep) == 2 and len(ids) <= 96
        assert types[: ids.index(sep) + 1] == [0] * (ids.index(sep) + 1) and set(types[ids.index(sep) + 1 :]) == {1}
    again = nsp_dataset(dataset, bert_tokenizer, max_seq_length=96, seed=7, batch_size=10)
    assert again["input_ids"] == result["input_ids"]
    assert (
        nsp_dataset(dataset, bert_tokenizer, max_seq_length=96, seed=8, batch_size=10)["input_ids"]
        != again["input_ids"]
    )


def test_nsp_dataset_is_reproducible_under_num_proc(bert_tokenizer, corpus):
    # Two workers each take one shard of 10 documents = one batch of 10, the same batches as one process: a
    # batch's seed comes from its documents, not from the worker or position, so the examples are identical.
    dataset = Dataset.from_dict({"text": corpus[:20]})
    single = nsp_dataset(dataset, bert_tokenizer, max_seq_length=96, seed=7, batch_size=10)
    parallel = nsp_dataset(dataset, bert_tokenizer, max_seq_length=96, seed=7, batch_size=10, num_proc=2)
    assert parallel["input_ids"] == single["input_ids"]
    assert parallel["next_sentence_label"] == single["next_sentence_label"]


def test_collators_re_export_the_nsp_builders():
    assert collators.create_nsp_examples is nsp_examples.create_nsp_examples
    assert collators.nsp_dataset is nsp_examples.nsp_dataset


def test_nsp_dataset_errors(bert_tokenizer):
    dataset = Dataset.from_dict({"body": ["Some text. More text."]})
    with pytest.raises(ValueError, match="`text_column`"):
        nsp_dataset(dataset, bert_tokenizer)
    with pytest.raises(TypeError, match="`dataset`"):
        nsp_dataset([{"text": "a"}], bert_tokenizer)
    with pytest.raises(ValueError, match="`dataset`"):
        nsp_dataset(Dataset.from_dict({"text": []}), bert_tokenizer)
    with pytest.raises(ValueError, match="`nsp_probability`"):
        nsp_dataset(dataset, bert_tokenizer, text_column="body", nsp_probability=2)
    with pytest.raises(ValueError, match="`batch_size`"):
        nsp_dataset(dataset, bert_tokenizer, text_column="body", batch_size=0)


@pytest.mark.parametrize(
    ("documents", "error", "name"),
    [
        ([], ValueError, "`documents`"),
        ("Just a string.", TypeError, "`documents`"),
        (["First sentence. Second."], TypeError, r"`documents\[0\]`"),
        ([["Fine.", {"text": "no"}]], TypeError, r"`documents\[0\]\[1\]`"),
        ([["Fine.", [1.5, 2.5]]], TypeError, r"`documents\[0\]\[1\]`"),
        ([["Fine.", [5, 10**7]]], ValueError, r"`documents\[0\]\[1\]`"),
        ([[], ["", ""]], ValueError, "`documents`"),
    ],
)
def test_bad_documents_name_themselves(bert_tokenizer, documents, error, name):
    with pytest.raises(error, match=name):
        create_nsp_examples(documents, bert_tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_seq_length": 4}, "max_seq_length"),
        ({"max_seq_length": 128.0}, "max_seq_length"),
        ({"short_seq_prob": 1.1}, "short_seq_prob"),
        ({"nsp_probability": -0.5}, "nsp_probability"),
        ({"seed": "seven"}, "seed"),
    ],
)
def test_bad_arguments_name_themselves(bert_tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        create_nsp_examples([["A b c.", "D e f."]] * 2, bert_tokenizer, **kwargs)


@pytest.mark.parametrize("missing", ["cls_token", "sep_token"])
def test_tokenizer_without_cls_or_sep(bert_tokenizer, missing):
    tokenizer = copy.deepcopy(bert_tokenizer)
    setattr(tokenizer, missing, None)
    with pytest.raises(ValueError, match=f"`{missing}_id`"):
        create_nsp_examples([["A b c.", "D e f."]], tokenizer)


def test_tokenizer_limits(bert_tokenizer):
    limited = copy.deepcopy(bert_tokenizer)
    limited.model_max_length = 64
    with pytest.raises(ValueError, match="`max_seq_length`=128 exceeds"):
        create_nsp_examples([["A b c.", "D e f."]], limited)
    assert create_nsp_examples([["A b c.", "D e f."]] * 2, limited, max_seq_length=64, seed=0)
    with pytest.raises(TypeError, match="`tokenizer`"):
        create_nsp_examples([["A b c."]], "bert-base-uncased")
