"""DataCollatorForBartDenoising against fairseq's DenoisingDataset: each noising function alone, then together."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from hf_stability.collators import DataCollatorForBartDenoising
from hf_stability.collators.bart import POISSON_LAMBDA_RANGE, _draw_span_lengths, _poisson_cdf

OFF = dict(mask_ratio=0.0, permute_sentence_ratio=0.0, rotate_ratio=0.0, insert_ratio=0.0)


@pytest.fixture(scope="module")
def words(bart_tokenizer) -> list[int]:
    """Ids of whole-word tokens ("Ġthe", "Ġvalue", …): in rows made of distinct ones, every token is one word
    and every position can be traced back."""
    vocab = bart_tokenizer.get_vocab()
    return sorted(i for t, i in vocab.items() if t.startswith("Ġ") and t.strip("Ġ").isalpha())


@pytest.fixture(scope="module")
def period(bart_tokenizer) -> int:
    return bart_tokenizer.convert_tokens_to_ids(".")


@pytest.fixture(scope="module")
def corpus_rows(bart_tokenizer, corpus) -> list[list[int]]:
    """`bos … eos` rows of real text (multi-token words), each starting at a word start."""
    tok = bart_tokenizer
    rows = []
    for doc in corpus[:60]:
        ids = tok(" " + " ".join(doc.split()), add_special_tokens=False).input_ids
        for start in range(0, len(ids) - 150, 400):
            while not tok.convert_ids_to_tokens(ids[start]).startswith("Ġ"):
                start += 1
            rows.append([tok.bos_token_id, *ids[start : start + 120], tok.eos_token_id])
    return rows


@pytest.fixture(scope="module")
def stop_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level byte-BPE-style vocabulary with both a "." and a "Ġ." token, as GPT-2's has ('13' and ' .')."""
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = specials + [f"Ġw{i}" for i in range(300)] + [".", "Ġ."]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>")),
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def word_rows(tokenizer, words: list[int], lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        [tokenizer.bos_token_id, *rng.choice(words, n, replace=False).tolist(), tokenizer.eos_token_id] for n in lengths
    ]


def sentence_rows(tokenizer, words: list[int], period: int, count: int, seed: int = 0) -> list[list[int]]:
    """Rows of 2-8 sentences of distinct words, each sentence closed by '.', the last one sometimes not."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        pool = iter(rng.choice(words, 120, replace=False).tolist())
        body = []
        sentences = int(rng.integers(2, 9))
        for index in range(sentences):
            body += [next(pool) for _ in range(int(rng.integers(1, 7)))]
            if index < sentences - 1 or rng.random() < 0.5:
                body.append(period)
        rows.append([tokenizer.bos_token_id, *body, tokenizer.eos_token_id])
    return rows


def split_sentences(body: list[int], period: int) -> list[list[int]]:
    """Sentences as fairseq sees them: each ends after a '.', and whatever precedes eos is the last one."""
    sentences, current = [], []
    for token in body:
        current.append(token)
        if token == period:
            sentences.append(current)
            current = []
    return sentences + ([current] if current else [])


def real(batch, key: str, index: int) -> list[int]:
    values = batch[key][index]
    if key == "input_ids":
        return values[batch["attention_mask"][index].bool()].tolist()
    return values[values != -100].tolist()


def is_subsequence(short: list[int], long: list[int]) -> bool:
    stream = iter(long)
    return all(token in stream for token in short)


def collate(tokenizer, rows, **kwargs):
    return DataCollatorForBartDenoising(tokenizer, **{"seed": 0, **kwargs})([{"input_ids": r} for r in rows])


def test_permutation_alone_moves_whole_sentences(bart_tokenizer, words, period):
    rows = sentence_rows(bart_tokenizer, words, period, 200)
    batch = collate(bart_tokenizer, rows, **{**OFF, "permute_sentence_ratio": 1.0})
    reordered = 0
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        assert out[0] == row[0] and out[-1] == row[-1] and sorted(out) == sorted(row)
        sentences = split_sentences(row[1:-1], period)
        order = sentence_order(out, sentences)
        assert sorted(order) == list(range(len(sentences)))
        reordered += order != sorted(order)
    assert reordered > 150  # 2-8 sentences per row: only ~1/n! of rows keep their order


def sentence_order(out: list[int], sentences: list[list[int]]) -> list[int]:
    """Which input sentence sits at each place of the output body (words are distinct: the first word tells)."""
    by_first = {s[0]: index for index, s in enumerate(sentences)}
    position, order = 1, []
    while position < len(out) - 1:
        index = by_first[out[position]]
        assert out[position : position + len(sentences[index])] == sentences[index]
        order.append(index)
        position += len(sentences[index])
    return order


def test_partial_permutation_moves_at_most_ceil_ratio_sentences(bart_tokenizer, words, period):
    rows = sentence_rows(bart_tokenizer, words, period, 200, seed=1)
    batch = collate(bart_tokenizer, rows, **{**OFF, "permute_sentence_ratio": 0.4})
    moved_rows = 0
    for index, row in enumerate(rows):
        sentences = split_sentences(row[1:-1], period)
        order = sentence_order(real(batch, "input_ids", index), sentences)
        assert sorted(order) == list(range(len(sentences)))
        moved = sum(place != sentence for place, sentence in enumerate(order))
        assert moved <= math.ceil(len(sentences) * 0.4)
        moved_rows += moved > 0
    assert moved_rows > 50


def test_only_the_plain_full_stop_ends_a_sentence_as_in_fairseq(stop_tokenizer):
    """fairseq's GPT-2 setup ends sentences at '.' (dictionary '13') only; 'Ġ.' is a token inside a sentence.
    Passing both ids to `full_stop_token_ids` ends sentences at either."""
    tok = stop_tokenizer
    period, spaced = tok.convert_tokens_to_ids(["."]) + tok.convert_tokens_to_ids(["Ġ."])
    words = [i for t, i in tok.get_vocab().items() if t.startswith("Ġw")]
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(150):
        pool, body = iter(rng.choice(words, 120, replace=False).tolist()), []
        for _ in range(int(rng.integers(3, 8))):
            body += [next(pool) for _ in range(int(rng.integers(1, 5)))]
            body.append(period if rng.random() < 0.5 else spaced)
        rows.append([tok.bos_token_id, *body, tok.eos_token_id])

    def orders(full_stops: list[int], **options) -> list[list[int]]:
        batch = collate(tok, rows, **{**OFF, "permute_sentence_ratio": 1.0, **options})
        result = []
        for index, row in enumerate(rows):
            sentences, current = [], []
            for token in row[1:-1]:
                current.append(token)
                if token in full_stops:
                    sentences, current = [*sentences, current], []
            sentences += [current] if current else []
            result.append(sentence_order(real(batch, "input_ids", index), sentences))
        return result

    moved = orders([period])  # fails inside sentence_order if a 'Ġ.' split a sentence
    assert sum(order != sorted(order) for order in moved) > 50
    finer = orders([period, spaced], full_stop_token_ids=[period, spaced])
    assert sum(len(order) for order in finer) > sum(len(order) for order in moved)


def removed_words(starts: set[int], row: list[int], out: list[int]) -> tuple[int, int]:
    """(words in the row, words missing from the output), counting word-start tokens (Ġ…)."""
    before = sum(t in starts for t in row)
    return before, before - sum(t in starts for t in out)


def fairseq_reference(rng: np.random.Generator, word_start: np.ndarray, ratio: float, rate: float) -> int:
    """fairseq's add_whole_word_mask written out span by span; returns how many words it masks."""
    budget = math.ceil(np.float32(word_start.sum()) * np.float32(ratio))
    lengths: list[int] = []
    while sum(lengths) < budget:
        lengths.append(int(rng.poisson(rate)))
    lengths[-1] -= sum(lengths) - budget
    lengths = [n for n in lengths if n > 0]
    covered = set()
    for start, length in zip(rng.choice(np.flatnonzero(word_start), len(lengths), replace=False), lengths, strict=True):
        position, remaining = int(start), length - 1
        covered.add(position)
        while position + 1 < len(word_start) - 1:
            remaining -= int(word_start[position + 1])
            if remaining < 0:
                break
            position += 1
            covered.add(position)
    return sum(int(word_start[p]) for p in covered)


def test_infilling_alone_matches_fairseq(bart_tokenizer, corpus_rows):
    """Text infilling on real text: in-order survivors, one <mask> per span, and the share of words removed
    equals that of a literal re-statement of fairseq's loop (spans overlap, so it is a little under 30%)."""
    tok = bart_tokenizer
    # Half the rows start mid-word: fairseq never masks such a first token and does not count it as a word.
    rows = corpus_rows[:150] + [[row[0], *row[2:]] for row in corpus_rows[:150]]
    batch = collate(tok, rows, **{**OFF, "mask_ratio": 0.3, "random_ratio": 0.0})
    first_tokens_without_marker = 0
    ours, reference = [], []
    rng = np.random.default_rng(1)
    starts = {i for t, i in tok.get_vocab().items() if t.startswith("Ġ")}
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        assert out[0] == tok.bos_token_id and out[-1] == tok.eos_token_id
        kept = [t for t in out if t != tok.mask_token_id]
        assert is_subsequence(kept, row)
        total, removed = removed_words(starts, row, out)
        ours.append(removed / total)
        word_start = np.array([t.startswith("Ġ") for t in tok.convert_ids_to_tokens(row)])
        reference.append(fairseq_reference(rng, word_start, 0.3, 3.5) / total)
        if not word_start[1]:
            first_tokens_without_marker += 1
            assert out[1] == row[1]
    ours, reference = np.array(ours), np.array(reference)
    # Difference of two means of 300 per-row shares; 4.5 standard errors leaves no room for a wrong rule
    # (e.g. no overlap -> 0.30, one word per span -> 0.26 with different spread) yet never flakes.
    tolerance = 4.5 * math.sqrt(ours.var() / len(ours) + reference.var() / len(reference))
    assert abs(ours.mean() - reference.mean()) < tolerance
    assert 0.2 < ours.mean() < 0.3
    assert first_tokens_without_marker > 50


def test_span_lengths_follow_poisson():
    """The sampler behind infilling: Poisson(3.5) draws (zero-length ones counted as inserts), last one cut."""
    rng = np.random.default_rng(0)
    budget = np.array([20000, 15000, 1, 0, 7])
    lengths, spans, inserts = _draw_span_lengths(rng, budget, _poisson_cdf(3.5))
    per_row = np.split(lengths, np.cumsum(spans)[:-1])
    assert [int(r.sum()) for r in per_row] == budget.tolist()
    assert spans[3] == 0 and inserts[3] == 0
    observed = np.bincount(lengths[: spans[0] + spans[1]], minlength=13)[:13].astype(float)
    observed[0] = inserts[0] + inserts[1]
    draws = observed.sum() + (lengths[: spans[0] + spans[1]] > 12).sum()
    expected = np.array([math.exp(-3.5) * 3.5**k / math.factorial(k) for k in range(13)]) * draws
    chi_square = ((observed - expected) ** 2 / expected).sum()
    assert chi_square < 40  # 12 degrees of freedom: P(chi2 > 40) ~ 7e-5 (two cut draws barely register)
    assert abs(lengths[: spans[0] + spans[1]].sum() / draws - 3.5) < 0.05


def test_poisson_lambda_range_is_where_fairseqs_table_gives_lengths_above_zero(bart_tokenizer, corpus_rows):
    """Just outside the range the table has no (or a negligible, < 1e-7) chance of a length above 0; inside it
    the chance is at least 1e-7, and the sampler fills any budget without a loop, however small that chance."""
    low, high = POISSON_LAMBDA_RANGE
    assert _poisson_cdf(high * 1.0001).tolist() == [1.0]  # exp(-λ) < 1e-7: the table stops at length 0
    assert 1 - _poisson_cdf(high)[0] > 0.999
    assert 1 - _poisson_cdf(low)[0] == pytest.approx(1e-7)
    rng = np.random.default_rng(0)
    budget = np.array([30, 0, 5])
    lengths, spans, inserts = _draw_span_lengths(rng, budget, _poisson_cdf(1e-3))
    assert [int(part.sum()) for part in np.split(lengths, np.cumsum(spans)[:-1])] == budget.tolist()
    assert (lengths == 1).all() and spans.tolist() == [30, 0, 5]
    # ~1000 zero-length draws per span (P(length > 0) = 1e-3 / (1 + 1e-3)); negative binomial sd ~ sqrt(n)*1000.
    assert abs(inserts[0] / 30 - 1000) < 4.5 * 1000 / math.sqrt(30) and inserts[1] == 0
    DataCollatorForBartDenoising(bart_tokenizer, poisson_lambda=low)  # the bounds themselves are valid
    for rate in (0.3, 16.0, high):  # a large rate draws long spans, no longer all of length 0
        batch = collate(bart_tokenizer, corpus_rows[:4], **{**OFF, "mask_ratio": 0.3, "poisson_lambda": rate})
        assert batch["input_ids"].shape[0] == 4


def test_numpy_scalar_settings_act_as_the_numbers_they_print_as(bart_tokenizer, corpus_rows):
    features = [{"input_ids": r} for r in corpus_rows[:8]]
    plain = DataCollatorForBartDenoising(bart_tokenizer, seed=0, mask_ratio=0.3, poisson_lambda=3.5)(features)
    numpy = DataCollatorForBartDenoising(
        bart_tokenizer, seed=0, mask_ratio=np.float32(0.3), poisson_lambda=np.float64(3.5)
    )(features)
    assert all(torch.equal(plain[key], numpy[key]) for key in plain)


def test_zero_length_spans_become_insertions(bart_tokenizer, words):
    """With lambda 0.3 most spans are empty: masks appear between tokens that were neighbours."""
    tok = bart_tokenizer
    rows = word_rows(tok, words, [80] * 50)
    batch = collate(tok, rows, **{**OFF, "mask_ratio": 0.3, "poisson_lambda": 0.3, "random_ratio": 0.0})
    inserted = 0
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        for before, mask, after in zip(out, out[1:], out[2:], strict=False):
            if mask == tok.mask_token_id and after != tok.mask_token_id and before != tok.mask_token_id:
                inserted += row.index(after) == row.index(before) + 1
    assert inserted > 200  # ~24 words budgeted per row, ~3/4 of draws are 0: hundreds of pure insertions


def test_token_masking_alone(bart_tokenizer, corpus_rows):
    tok = bart_tokenizer
    rows = corpus_rows[:100]
    batch = collate(tok, rows, **{**OFF, "mask_ratio": 0.3, "mask_length": "subword", "random_ratio": 0.0})
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        assert len(out) == len(row)
        changed = [i for i, (a, b) in enumerate(zip(row, out, strict=True)) if a != b]
        assert all(out[i] == tok.mask_token_id for i in changed)
        assert len(changed) == math.ceil(np.float32(len(row) - 2) * np.float32(0.3))
        assert 0 not in changed and len(row) - 1 not in changed


def test_token_deletion_alone(bart_tokenizer, corpus_rows):
    tok = bart_tokenizer
    rows = corpus_rows[:100]
    batch = collate(tok, rows, **{**OFF, "mask_ratio": 0.3, "mask_length": "subword", "replace_length": 0})
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        assert tok.mask_token_id not in out and is_subsequence(out, row)
        assert len(row) - len(out) == math.ceil(np.float32(len(row) - 2) * np.float32(0.3))
        assert out[0] == row[0] and out[-1] == row[-1]


@pytest.mark.parametrize("first_token_starts_word", [False, True])
def test_whole_word_masking_every_token(bart_tokenizer, corpus_rows, first_token_starts_word):
    """mask_length='word', replace_length=-1: whole words become masks token by token. The row's first token
    ("Hello", no Ġ) is a word start only with first_token_starts_word; by default, as in fairseq, it is never
    masked and not counted, so even mask_ratio 1 leaves it."""
    tok = bart_tokenizer
    rows = [[tok.bos_token_id, *tok("Hello world, again.", add_special_tokens=False).input_ids, tok.eos_token_id]]
    rows += corpus_rows[:50]
    options = {**OFF, "mask_length": "word", "replace_length": -1, "random_ratio": 0}
    options["first_token_starts_word"] = first_token_starts_word
    batch = collate(tok, rows, **{**options, "mask_ratio": 0.25})
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        assert len(out) == len(row)
        tokens = tok.convert_ids_to_tokens(row)
        word_start = [(i == 1 and first_token_starts_word) or t.startswith("Ġ") for i, t in enumerate(tokens)]
        word_start[0] = word_start[-1] = False
        masked_words = 0
        for i in range(1, len(row) - 1):
            if out[i] == tok.mask_token_id and word_start[i]:
                masked_words += 1
            if i > 1 and not word_start[i]:  # a continuation shares its word's fate
                assert (out[i] == tok.mask_token_id) == (out[i - 1] == tok.mask_token_id)
        assert masked_words == math.ceil(np.float32(sum(word_start)) * np.float32(0.25))
    everything = real(collate(tok, rows[:1], **{**options, "mask_ratio": 1.0}), "input_ids", 0)
    first_word = next(i for i, t in enumerate(tok.convert_ids_to_tokens(rows[0])) if t.startswith("Ġ"))
    assert first_word > 2  # "Hello" is several tokens, none with Ġ
    kept = rows[0][:1] if first_token_starts_word else rows[0][:first_word]
    assert everything == kept + [tok.mask_token_id] * (len(rows[0]) - 1 - len(kept)) + rows[0][-1:]


def test_rotation_alone(bart_tokenizer, words):
    tok = bart_tokenizer
    rows = word_rows(tok, words, list(range(3, 203)))
    batch = collate(tok, rows, **{**OFF, "rotate_ratio": 0.5})
    rotated = 0
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        body, new = row[1:-1], out[1:-1]
        assert out[0] == row[0] and out[-1] == row[-1]
        offset = body.index(new[0])
        assert new == body[offset:] + body[:offset]
        rotated += offset != 0
    # Rows rotate with probability 0.5; fairseq draws the offset in [1, n+1] for n body tokens and the ends
    # leave the body as it was, so the expected count is 0.5 * sum((n-1)/(n+1), n=1..200) ~ 95; sd ~7.
    assert 95 - 35 < rotated < 95 + 35


def test_insertion_alone(bart_tokenizer, words):
    tok = bart_tokenizer
    rows = word_rows(tok, words, [10, 50, 100, 199] * 10)
    batch = collate(tok, rows, **{**OFF, "insert_ratio": 0.1, "random_ratio": 0.5})
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        count = math.ceil(len(row) * 0.1)
        assert len(out) == len(row) + count
        assert out[0] == row[0] and out[-1] == row[-1]
        masks = sum(t == tok.mask_token_id for t in out)
        assert masks == count - math.ceil(count * 0.5)
        assert is_subsequence(row, [t for t in out if t != tok.mask_token_id])


def test_random_ratio_share_of_masks(bart_tokenizer, corpus_rows):
    tok = bart_tokenizer
    rows = corpus_rows[:100]
    batch = collate(tok, rows, **{**OFF, "mask_ratio": 0.3, "mask_length": "subword", "random_ratio": 0.3})
    masks = randoms = 0
    specials = set(tok.all_special_ids)
    for index, row in enumerate(rows):
        out = real(batch, "input_ids", index)
        for a, b in zip(row, out, strict=True):
            masks += b == tok.mask_token_id
            randoms += a != b and b != tok.mask_token_id
            assert b not in specials or b == a or b == tok.mask_token_id
    share = randoms / (masks + randoms)
    # ~3,700 masked positions; binomial sd = sqrt(.21/3700) = 0.0075; a random draw equal to the original
    # (1/1995) hides a negligible 0.015% of them.
    assert abs(share - 0.3) < 4.5 * math.sqrt(0.21 / (masks + randoms))


def test_defaults_keep_bos_eos_labels_and_decoder_inputs(bart_tokenizer, corpus_rows):
    tok = bart_tokenizer
    rows = corpus_rows[:8] + [corpus_rows[9][:20] + [tok.eos_token_id]]
    batch = DataCollatorForBartDenoising(tok, seed=0, pad_to_multiple_of=16, insert_ratio=0.1, rotate_ratio=0.5)(
        [{"input_ids": torch.tensor(r)} for r in rows]
    )
    assert batch["input_ids"].shape[1] % 16 == 0 and batch["labels"].shape[1] % 16 == 0
    for index, row in enumerate(rows):
        assert real(batch, "labels", index) == row
        out = real(batch, "input_ids", index)
        assert out[0] == tok.bos_token_id and out[-1] == tok.eos_token_id
        assert tok.bos_token_id not in out[1:] and tok.eos_token_id not in out[:-1]
    expected = torch.cat([torch.full((len(rows), 1), tok.eos_token_id), batch["labels"][:, :-1]], dim=1)
    expected[expected == -100] = tok.pad_token_id
    assert torch.equal(batch["decoder_input_ids"], expected)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    custom = collate(tok, rows[:1], decoder_start_token_id=5)
    assert custom["decoder_input_ids"][0, 0].item() == 5


def test_seed_reproducible(bart_tokenizer, corpus_rows):
    features = [{"input_ids": r} for r in corpus_rows[:6]]

    def run(seed):
        collator = DataCollatorForBartDenoising(bart_tokenizer, seed=seed, insert_ratio=0.05, rotate_ratio=0.5)
        return [collator(features)["input_ids"] for _ in range(3)]

    first, again, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_errors_name_the_argument(bart_tokenizer, corpus_rows):
    tok = bart_tokenizer
    for name in ("mask_ratio", "random_ratio", "permute_sentence_ratio", "rotate_ratio", "insert_ratio"):
        with pytest.raises(ValueError, match=name):
            DataCollatorForBartDenoising(tok, **{name: 1.5})
    for rate in (0, -1.0, 1e-9, 16.2, 100.0, float("inf"), float("nan"), "3.5", True):
        with pytest.raises(ValueError, match="poisson_lambda"):
            DataCollatorForBartDenoising(tok, poisson_lambda=rate)
    with pytest.raises(ValueError, match="replace_length"):
        DataCollatorForBartDenoising(tok, replace_length=2)
    with pytest.raises(ValueError, match="mask_length"):
        DataCollatorForBartDenoising(tok, mask_length="span")
    with pytest.raises(ValueError, match="replace_length"):
        DataCollatorForBartDenoising(tok, mask_length="subword", replace_length=-1)
    with pytest.raises(ValueError, match="full_stop_token_ids"):
        DataCollatorForBartDenoising(tok, full_stop_token_ids=[])
    backend = tok.backend_tokenizer
    with pytest.raises(ValueError, match="mask_token"):
        DataCollatorForBartDenoising(
            PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        )
    with pytest.raises(ValueError, match="bos_token"):
        DataCollatorForBartDenoising(
            PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", mask_token="<mask>")
        )
    with pytest.raises(TypeError, match="tokenizer"):
        DataCollatorForBartDenoising(None)
    collator = DataCollatorForBartDenoising(tok)
    with pytest.raises(ValueError, match="empty"):
        collator([])
    with pytest.raises(ValueError, match="input_ids"):
        collator([{"ids": corpus_rows[0]}])
    with pytest.raises(ValueError, match=r"features\[1\].*bos"):
        collator([{"input_ids": corpus_rows[0]}, {"input_ids": corpus_rows[0][1:]}])
    with pytest.raises(ValueError, match=r"features\[0\]"):
        collator([{"input_ids": [tok.bos_token_id]}])
    with pytest.raises(ValueError, match=r"features\[1\].*10000000.*vocabulary"):
        collator([{"input_ids": corpus_rows[0]}, {"input_ids": [tok.bos_token_id, 10**7, tok.eos_token_id]}])
    with pytest.raises(ValueError, match=r"features\[0\].*-100"):
        collator([{"input_ids": [tok.bos_token_id, -100, tok.eos_token_id]}])
    with pytest.raises(ValueError, match="Every row .* empty"):
        collator([{"input_ids": []}, {"input_ids": []}])
