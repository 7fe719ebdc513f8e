"""DataCollatorForBertPretraining: Google's exact count, 80/10/10, special tokens, whole words, seeds, errors."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

from hf_stability.collators import DataCollatorForBertPretraining


@pytest.fixture(scope="module")
def stream(bert_tokenizer, corpus) -> list[int]:
    """Token ids of the embedded corpus without special tokens (no [UNK]), a few tens of thousands of them."""
    specials = set(bert_tokenizer.all_special_ids)
    ids = (i for doc in corpus[:40] for i in bert_tokenizer(doc, add_special_tokens=False).input_ids)
    return [i for i in ids if i not in specials]


def make_rows(tokenizer, stream: list[int], lengths: list[int]) -> list[list[int]]:
    """Rows `[CLS] body [SEP]` of the given total lengths, cut from different places of the corpus."""
    rows = []
    for index, length in enumerate(lengths):
        start = (index * 7919) % (len(stream) - length)
        rows.append([tokenizer.cls_token_id, *stream[start : start + length - 2], tokenizer.sep_token_id])
    return rows


def google_count(length: int, probability: float, cap: int | None) -> int:
    """Google's count, written the way create_pretraining_data.py writes it (Python's round)."""
    return min(cap if cap is not None else 10**9, max(1, int(round(length * probability))))


def chosen_of(batch) -> np.ndarray:
    return (batch["labels"] != -100).numpy()


@pytest.mark.parametrize(
    ("probability", "cap"),
    [(0.15, None), (0.15, 5), (0.5, None)],  # 0.5 on odd lengths hits x.5 exactly: banker's rounding matters
)
def test_exact_count_per_row(bert_tokenizer, stream, probability, cap):
    lengths = list(range(5, 300, 7))
    rows = make_rows(bert_tokenizer, stream, lengths)
    collator = DataCollatorForBertPretraining(bert_tokenizer, mlm_probability=probability, max_predictions=cap, seed=1)
    counts = chosen_of(collator([{"input_ids": r} for r in rows])).sum(axis=1)
    assert counts.tolist() == [google_count(n, probability, cap) for n in lengths]
    if probability == 0.5:  # the rule really is half-to-even, not half-up
        assert google_count(7, 0.5, None) == 4 and google_count(9, 0.5, None) == 4


def test_exact_count_ignores_padding_already_in_features_and_minimum_of_one(bert_tokenizer, stream):
    pad = bert_tokenizer.pad_token_id
    rows = make_rows(bert_tokenizer, stream, [40, 3])
    features = [{"input_ids": rows[0] + [pad] * 60}, {"input_ids": rows[1]}]
    counts = chosen_of(DataCollatorForBertPretraining(bert_tokenizer, seed=0)(features)).sum(axis=1)
    assert counts.tolist() == [google_count(40, 0.15, None), 1]


@pytest.mark.parametrize(("mask_prob", "random_prob"), [(0.8, 0.1), (0.5, 0.4)])
def test_replacement_proportions(bert_tokenizer, stream, mask_prob, random_prob):
    rows = make_rows(bert_tokenizer, stream, [512] * 100)
    collator = DataCollatorForBertPretraining(
        bert_tokenizer, mask_replace_prob=mask_prob, random_replace_prob=random_prob, seed=3
    )
    batch = collator([{"input_ids": r} for r in rows])
    chosen = chosen_of(batch)
    inputs, labels = batch["input_ids"].numpy()[chosen], batch["labels"].numpy()[chosen]
    total = chosen.sum()  # 100 rows x 77 = 7,700 chosen positions
    observed = {
        "mask": np.mean(inputs == bert_tokenizer.mask_token_id),
        "random": np.mean((inputs != bert_tokenizer.mask_token_id) & (inputs != labels)),
        "keep": np.mean(inputs == labels),
    }
    # A random draw equals the original with probability 1/len(non-special ids) ~ 1/1995; that shifts
    # at most 0.4/1995 = 2e-4 from "random" to "keep", far below the tolerance.
    expected = {"mask": mask_prob, "random": random_prob, "keep": 1 - mask_prob - random_prob}
    for name, p in expected.items():
        # Each observed share is a binomial proportion over `total` trials: sigma = sqrt(p(1-p)/n);
        # 4.5 sigma keeps a false failure below 1e-5 per check (~0.021 for p=0.8, ~0.016 for p=0.1).
        sigma = math.sqrt(p * (1 - p) / total)
        assert abs(observed[name] - p) < 4.5 * sigma + 1e-3, (name, observed[name], p)


def test_special_tokens_never_chosen_nor_inserted(bert_tokenizer, stream):
    specials = set(bert_tokenizer.all_special_ids)
    rows = make_rows(bert_tokenizer, stream, [200] * 40)
    for row in rows:  # sprinkle every special token into the body
        for offset, special in enumerate(sorted(specials)):
            row[10 + 17 * offset] = special
    collator = DataCollatorForBertPretraining(
        bert_tokenizer, mlm_probability=0.9, mask_replace_prob=0.0, random_replace_prob=1.0, seed=5
    )
    batch = collator([{"input_ids": r} for r in rows])
    original = np.array(rows)
    is_special = np.isin(original, list(specials))
    chosen = chosen_of(batch)
    assert not (chosen & is_special).any()
    inputs = batch["input_ids"].numpy()
    assert (inputs[is_special] == original[is_special]).all()
    replaced = inputs[chosen]
    assert not np.isin(replaced, list(specials)).any()
    # the replacements cover the vocabulary (7,200 draws from ~1,995 ids leave few ids unseen)
    assert len(np.unique(replaced)) > 1500 and replaced.max() < len(bert_tokenizer)


@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_labels_and_inputs_are_consistent(bert_tokenizer, stream, whole_word_mask):
    rows = make_rows(bert_tokenizer, stream, [30, 300, 120])
    collator = DataCollatorForBertPretraining(bert_tokenizer, whole_word_mask=whole_word_mask, seed=2)
    batch = collator([{"input_ids": r} for r in rows])
    chosen = chosen_of(batch)
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    for index, row in enumerate(rows):
        row = np.array(row)
        n = len(row)
        assert (labels[index, :n][chosen[index, :n]] == row[chosen[index, :n]]).all()
        assert (inputs[index, :n][~chosen[index, :n]] == row[~chosen[index, :n]]).all()
        kept = chosen[index, :n] & (inputs[index, :n] == row)
        assert (labels[index, :n][kept] == inputs[index, :n][kept]).all()
        assert (labels[index, n:] == -100).all()


def test_bernoulli_mean_rate_and_cap(bert_tokenizer, stream):
    rows = make_rows(bert_tokenizer, stream, [512] * 100)
    features = [{"input_ids": r} for r in rows]
    chosen = chosen_of(DataCollatorForBertPretraining(bert_tokenizer, masking="bernoulli", seed=4)(features))
    candidates = 100 * 510  # every token but [CLS]/[SEP]
    rate = chosen.sum() / candidates
    # chosen count ~ Binomial(candidates ~ 51,000, 0.15): sigma = sqrt(0.15*0.85/n) ~ 0.0016; allow 4.5 sigma.
    assert abs(rate - 0.15) < 4.5 * math.sqrt(0.15 * 0.85 / candidates)
    assert len(set(chosen.sum(axis=1).tolist())) > 5  # the count varies per row, unlike "exact"

    capped = DataCollatorForBertPretraining(bert_tokenizer, masking="bernoulli", max_predictions=70, seed=4)
    counts = chosen_of(capped(features)).sum(axis=1)
    assert counts.max() == 70 and (counts <= 70).all() and counts.min() < 70


def word_groups(tokens: list[str]) -> list[list[int]]:
    """Positions of each word: a token plus its following `##` tokens (specials are their own group)."""
    groups: list[list[int]] = []
    for position, token in enumerate(tokens):
        if token.startswith("##") and groups and not tokens[groups[-1][0]].startswith("["):
            groups[-1].append(position)
        else:
            groups.append([position])
    return groups


def test_whole_word_mask_with_wordpiece_continuations(bert_tokenizer, stream):
    lengths = [512] * 30 + list(range(20, 200, 13))
    rows = make_rows(bert_tokenizer, stream, lengths)
    collator = DataCollatorForBertPretraining(bert_tokenizer, whole_word_mask=True, seed=6)
    chosen = chosen_of(collator([{"input_ids": r} for r in rows]))
    multi_token_words_chosen = 0
    for index, row in enumerate(rows):
        for group in word_groups(bert_tokenizer.convert_ids_to_tokens(row)):
            picked = chosen[index, group]
            assert picked.all() or not picked.any(), (index, group)
            multi_token_words_chosen += int(picked.all() and len(group) > 1)
    # Google's greedy fills the count exactly while single-token words remain to fill the gap.
    assert chosen.sum(axis=1).tolist() == [google_count(n, 0.15, None) for n in lengths]
    assert multi_token_words_chosen > 50


def test_whole_word_mask_follows_word_ids(bert_tokenizer, stream):
    # word ids pairing tokens two by two: a grouping the `##` rule would never produce
    rows = make_rows(bert_tokenizer, stream, [101] * 40)
    word_ids = [None, *[i // 2 for i in range(99)], None]
    features = [{"input_ids": r, "word_ids": word_ids} for r in rows]
    collator = DataCollatorForBertPretraining(bert_tokenizer, whole_word_mask=True, seed=7)
    chosen = chosen_of(collator(features))[:, 1:100]
    pairs = chosen[:, :98].reshape(40, 49, 2)
    assert (pairs[..., 0] == pairs[..., 1]).all()
    assert chosen.sum(axis=1).tolist() == [round(101 * 0.15)] * 40  # 15: the single last word fills the odd slot


def test_whole_word_mask_with_tokenizer_word_ids(bert_tokenizer, corpus):
    encoded = bert_tokenizer(corpus[5:25], truncation=True, max_length=128)
    features = [
        {"input_ids": encoded["input_ids"][i], "word_ids": encoded.word_ids(i)}
        for i in range(len(encoded["input_ids"]))
    ]
    batch = DataCollatorForBertPretraining(bert_tokenizer, whole_word_mask=True, masking="bernoulli", seed=8)(features)
    chosen = chosen_of(batch)
    for index, feature in enumerate(features):
        by_word: dict[int, set[bool]] = {}
        for position, word in enumerate(feature["word_ids"]):
            if word is not None:
                by_word.setdefault(word, set()).add(bool(chosen[index, position]))
        assert all(len(states) == 1 for states in by_word.values())
    assert chosen.any()


def test_seed_reproducibility(bert_tokenizer, stream):
    features = [{"input_ids": r} for r in make_rows(bert_tokenizer, stream, [64, 128, 90])]

    def run(seed, **kwargs):
        collator = DataCollatorForBertPretraining(bert_tokenizer, seed=seed, **kwargs)
        return [collator(features)["input_ids"] for _ in range(2)]

    for kwargs in ({}, {"whole_word_mask": True, "masking": "bernoulli"}):
        first, again, other = run(11, **kwargs), run(11, **kwargs), run(12, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not torch.equal(first[0], first[1])  # the stream moves on between batches
        assert not torch.equal(first[0], other[0])
    # seed=None follows torch's global generator, which Trainer seeds with args.seed
    torch.manual_seed(0)
    unseeded_a = DataCollatorForBertPretraining(bert_tokenizer)(features)["input_ids"]
    torch.manual_seed(0)
    unseeded_b = DataCollatorForBertPretraining(bert_tokenizer)(features)["input_ids"]
    assert torch.equal(unseeded_a, unseeded_b)


def test_padding_and_pass_through(bert_tokenizer, stream):
    rows = make_rows(bert_tokenizer, stream, [10, 21, 7])
    features = [
        {"input_ids": torch.tensor(r), "token_type_ids": [0] * 4 + [1] * (len(r) - 4), "next_sentence_label": i % 2}
        for i, r in enumerate(rows)
    ]
    batch = DataCollatorForBertPretraining(bert_tokenizer, pad_to_multiple_of=8, seed=0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_type_ids", "next_sentence_label"}
    assert batch["input_ids"].shape == (3, 24) and batch["input_ids"].dtype == torch.long
    assert batch["next_sentence_label"].tolist() == [0, 1, 0]
    for index, row in enumerate(rows):
        n = len(row)
        assert batch["attention_mask"][index].tolist() == [1] * n + [0] * (24 - n)
        assert (batch["input_ids"][index, n:] == bert_tokenizer.pad_token_id).all()
        assert (batch["labels"][index, n:] == -100).all()
        assert batch["token_type_ids"][index].tolist() == [0] * 4 + [1] * (n - 4) + [0] * (24 - n)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"mlm_probability": -0.1}, "mlm_probability"),
        ({"mask_replace_prob": 2.0}, "mask_replace_prob"),
        ({"random_replace_prob": -1.0}, "random_replace_prob"),
        ({"mask_replace_prob": 0.7, "random_replace_prob": 0.4}, "mask_replace_prob` + `random_replace_prob"),
        ({"masking": "poisson"}, "masking"),
        ({"max_predictions": 0}, "max_predictions"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_arguments_name_themselves(bert_tokenizer, kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
        DataCollatorForBertPretraining(bert_tokenizer, **kwargs)


@pytest.mark.parametrize("missing", ["mask_token", "cls_token", "sep_token", "pad_token"])
def test_tokenizer_without_required_token(bert_tokenizer, missing):
    tokenizer = copy.deepcopy(bert_tokenizer)
    setattr(tokenizer, missing, None)
    with pytest.raises(ValueError, match=f"`{missing}_id`"):
        DataCollatorForBertPretraining(tokenizer)


def test_not_a_tokenizer():
    with pytest.raises(TypeError, match="`tokenizer`"):
        DataCollatorForBertPretraining("bert-base-uncased")


@pytest.mark.parametrize(
    ("features", "name"),
    [
        ([], "features"),
        ({"input_ids": [2, 7, 3]}, "features"),
        ([{"text": "hello"}], "input_ids"),
        ([{"input_ids": [2, 99999, 3]}], "input_ids"),
        ([{"input_ids": [2, 7, 3]}, {"input_ids": [2, -100, 3]}], r"features\[1\]\['input_ids'\]` holds the id -100"),
        ([{"input_ids": []}, {"input_ids": []}], "Every row of `features` has an empty `input_ids`"),
        ([{"input_ids": [2, 7, 3], "token_type_ids": [0, 0]}], "token_type_ids"),
        ([{"input_ids": [2, 7, 3], "next_sentence_label": 0}, {"input_ids": [2, 8, 3]}], "next_sentence_label"),
        ([{"input_ids": [2, 7, 3], "next_sentence_label": "yes"}], "next_sentence_label"),
    ],
)
def test_bad_features_name_the_key(bert_tokenizer, features, name):
    with pytest.raises((ValueError, TypeError), match=f"`{name}`|'{name}'|{name}"):
        DataCollatorForBertPretraining(bert_tokenizer)(features)


def test_numpy_scalar_probabilities_act_as_the_numbers_they_print_as(bert_tokenizer, stream):
    """np.float32(0.15) is 0.15000000596 in binary; read as 0.15, so round(30 * p) is still 4 (Google's count)."""
    features = [{"input_ids": row} for row in make_rows(bert_tokenizer, stream, [30, 50, 64])]
    plain = DataCollatorForBertPretraining(bert_tokenizer, seed=0)(features)
    for probability in (np.float32(0.15), np.float64(0.15)):
        collator = DataCollatorForBertPretraining(
            bert_tokenizer, mlm_probability=probability, mask_replace_prob=np.float32(0.8), seed=0
        )
        batch = collator(features)
        assert all(torch.equal(plain[key], batch[key]) for key in plain)
    assert (plain["labels"][0] != -100).sum() == 4


@pytest.mark.parametrize(
    ("word_ids", "pattern"),
    [([None, 0], "word_ids"), ([None, "a", None], "word_ids")],
)
def test_bad_word_ids(bert_tokenizer, word_ids, pattern):
    collator = DataCollatorForBertPretraining(bert_tokenizer, whole_word_mask=True)
    with pytest.raises((ValueError, TypeError), match=pattern):
        collator([{"input_ids": [2, 7, 3], "word_ids": word_ids}])


def test_whole_word_mask_needs_continuations_or_word_ids(bart_tokenizer):
    collator = DataCollatorForBertPretraining(bart_tokenizer, whole_word_mask=True)
    ids = bart_tokenizer("Hello there, general reader.").input_ids
    with pytest.raises(ValueError, match="word_ids"):
        collator([{"input_ids": ids}])
    batch = collator([{"input_ids": ids, "word_ids": [None, *range(len(ids) - 2), None]}])
    assert (batch["labels"] != -100).sum() == max(1, round(len(ids) * 0.15))


def test_whole_word_mask_skips_words_that_would_overshoot(bert_tokenizer, stream):
    # 9 three-token words, count round(29 * 0.15) = 4: Google takes one word (3 tokens) and skips
    # every other word (3 + 3 > 4) instead of cutting a word to hit 4.
    rows = make_rows(bert_tokenizer, stream, [29] * 20)
    word_ids = [None, *[i // 3 for i in range(27)], None]
    collator = DataCollatorForBertPretraining(bert_tokenizer, whole_word_mask=True, seed=9)
    chosen = chosen_of(collator([{"input_ids": r, "word_ids": word_ids} for r in rows]))
    assert chosen.sum(axis=1).tolist() == [3] * 20
    triples = chosen[:, 1:28].reshape(20, 9, 3)
    assert (triples.all(axis=2) | ~triples.any(axis=2)).all()
