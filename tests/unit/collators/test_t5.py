"""DataCollatorForT5SpanCorruption and t5_span_corruption_lengths against T5's preprocessors."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_stability.collators import DataCollatorForT5SpanCorruption, t5_span_corruption_lengths


@pytest.fixture(scope="module")
def stream(t5_tokenizer, corpus) -> list[int]:
    """Corpus token ids with no special tokens (raw T5 rows carry no EOS)."""
    specials = set(t5_tokenizer.all_special_ids)
    ids = (i for doc in corpus[:30] for i in t5_tokenizer(doc, add_special_tokens=False).input_ids)
    return [i for i in ids if i not in specials]


@pytest.fixture(scope="module")
def ascending_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose sentinels are numbered upwards (<extra_id_0> has the smallest id)."""
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(100)]
    words = [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=specials[3:],
    )


def rows_of(stream: list[int], lengths: list[int]) -> list[list[int]]:
    return [stream[(i * 7919) % (len(stream) - n) :][:n] for i, n in enumerate(lengths)]


def t5_counts(length: int, density: float, mean: float) -> tuple[int, int]:
    """random_spans_noise_mask's counts, restated: float32 arithmetic, tf.round (half to even), clamps."""
    noise = int(np.rint(np.float32(length) * np.float32(density)))
    noise = min(max(noise, 1), length - 1)
    spans = max(1, int(np.rint(np.float32(noise) / np.float32(mean))))
    return noise, spans


def sentinel_ids(tokenizer) -> list[int]:
    """All of the tokenizer's sentinels, <extra_id_0> first, by token string."""
    vocab = tokenizer.get_vocab()
    return [vocab[f"<extra_id_{i}>"] for i in range(len(vocab)) if f"<extra_id_{i}>" in vocab]


def unpadded(tensor_row: torch.Tensor, mask_value: int) -> list[int]:
    values = tensor_row.tolist()
    while values and values[-1] == mask_value:
        values.pop()
    return values


def reconstruct(inputs: list[int], targets: list[int], sentinels: dict[int, int]) -> list[int]:
    """Replace each sentinel in the inputs by the tokens that follow the same sentinel in the targets."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets[:-1]:
        if token in sentinels:
            current = sentinels[token]
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out.extend(spans[sentinels[token]] if token in sentinels else [token])
    return out


@pytest.mark.parametrize("tokenizer_name", ["t5_tokenizer", "ascending_tokenizer"])
@pytest.mark.parametrize(("density", "mean"), [(0.15, 3.0), (0.5, 2.0), (0.3, 8.0), (0.05, 1.5)])
def test_reconstruction_counts_and_sentinel_order(request, stream, tokenizer_name, density, mean):
    tokenizer = request.getfixturevalue(tokenizer_name)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    vocab_words = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(2, 200, size=60)] + [2, 3, 4]
    if tokenizer_name == "t5_tokenizer":
        rows = rows_of(stream, lengths)
    else:
        rows = [rng.choice(vocab_words, size=n).tolist() for n in lengths]
    collator = DataCollatorForT5SpanCorruption(tokenizer, noise_density=density, mean_noise_span_length=mean, seed=5)
    batch = collator([{"input_ids": r} for r in rows])
    all_sentinels = sentinel_ids(tokenizer)
    lookup = {token: index for index, token in enumerate(all_sentinels)}
    for row, raw, inputs, labels, mask in zip(
        range(len(rows)), rows, batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        noise, spans = t5_counts(len(raw), density, mean)
        inputs = inputs[mask.bool()].tolist()
        targets = unpadded(labels, -100)
        assert inputs[-1] == eos and targets[-1] == eos, row
        assert reconstruct(inputs, targets, lookup) == raw, row
        # Sentinels appear once each, <extra_id_0>, <extra_id_1>, … left to right, in inputs and targets alike.
        assert [t for t in inputs if t in lookup] == all_sentinels[:spans]
        assert [t for t in targets if t in lookup] == all_sentinels[:spans]
        assert targets[0] == all_sentinels[0] and inputs[-2] == all_sentinels[spans - 1]  # spans end the row
        assert len(targets) == noise + spans + 1 and len(inputs) == len(raw) - noise + spans + 1
        # No empty span on either side: no two sentinels are adjacent.
        for side in (inputs, targets):
            assert not any(a in lookup and b in lookup for a, b in zip(side, side[1:], strict=False))
    assert batch["attention_mask"].sum(1).tolist() == [len(unpadded(r, pad)) for r in batch["input_ids"]]


def test_decoder_inputs_and_padding(t5_tokenizer, stream):
    rows = rows_of(stream, [30, 11])
    batch = DataCollatorForT5SpanCorruption(t5_tokenizer, seed=0, pad_to_multiple_of=8)(
        [{"input_ids": torch.tensor(rows[0])}, {"input_ids": rows[1]}]
    )
    pad = t5_tokenizer.pad_token_id
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape[1] % 8 == 0
    labels = batch["labels"]
    expected = torch.cat([torch.full((2, 1), pad), labels[:, :-1]], dim=1)
    expected[expected == -100] = pad
    assert torch.equal(batch["decoder_input_ids"], expected)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad).all()
    assert all(v.dtype == torch.long for v in batch.values())
    start = DataCollatorForT5SpanCorruption(t5_tokenizer, seed=0, decoder_start_token_id=7)([{"input_ids": rows[0]}])
    assert start["decoder_input_ids"][0, 0].item() == 7


def test_noise_span_lengths_are_uniform_compositions(ascending_tokenizer):
    """20 tokens at density 0.5, mean 2: 10 noise tokens in 5 spans. Every composition is equally likely, so
    P(first span = k) = C(10-k-1, 3) / C(9, 4); same for the 10 non-noise tokens."""
    collator = DataCollatorForT5SpanCorruption(
        ascending_tokenizer, noise_density=0.5, mean_noise_span_length=2.0, seed=11
    )
    raw = list(range(200, 220))
    first_noise, first_kept = [], []
    for _ in range(40):
        batch = collator([{"input_ids": raw}] * 100)
        targets, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
        first_noise.extend(np.argmax(targets[:, 1:] < 103, axis=1))  # ids < 103 are specials/sentinels
        first_kept.extend(np.argmax(inputs < 103, axis=1))
    exact = np.array([comb(10 - k - 1, 3) / comb(9, 4) for k in range(1, 7)])
    for observed in (np.array(first_noise), np.array(first_kept)):
        frequency = np.array([(observed == k).mean() for k in range(1, 7)])
        # 4,000 draws: binomial standard error <= sqrt(.25/4000) = 0.0079; 4.5 sigma keeps a fixed-seed test robust
        assert np.all(np.abs(frequency - exact) < 4.5 * np.sqrt(exact * (1 - exact) / len(observed)) + 1e-9)


def searched_lengths(inputs_length: int, density: float, mean: float, start: int) -> tuple[int, int]:
    """The longest raw length from ``start`` on whose inputs fit, with the density-0.5 adjustment."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise = int(round(tokens * density))
        spans = int(round(noise / mean))
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = start
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    inputs, targets = lengths(tokens)
    if density == 0.5 and targets > inputs:
        tokens, targets = tokens - 1, targets - 1
    return tokens, targets


def t5_random_spans_helper(inputs_length: int, density: float, mean: float) -> tuple[int, int]:
    """T5's random_spans_helper restated: the search starts from inputs_length - 1."""
    return searched_lengths(inputs_length, density, mean, start=inputs_length - 1)


def flax_example_helper(inputs_length: int, density: float, mean: float) -> tuple[int, int]:
    """transformers' compute_input_and_target_lengths: the same search started at inputs_length."""
    return searched_lengths(inputs_length, density, mean, start=inputs_length)


def test_length_helper_matches_t5_and_differs_from_flax_example():
    assert t5_span_corruption_lengths(512) == (568, 114)
    assert t5_span_corruption_lengths(512, 0.15, 3.0) == t5_random_spans_helper(512, 0.15, 3.0)
    grid = [(n, d, m) for n in (16, 64, 128, 512, 1024) for d in (0.1, 0.15, 0.3, 0.5) for m in (1.0, 2.0, 3.0, 8.0)]
    differs = []
    for n, d, m in grid:
        assert t5_span_corruption_lengths(n, d, m) == t5_random_spans_helper(n, d, m), (n, d, m)
        if flax_example_helper(n, d, m) != t5_random_spans_helper(n, d, m):
            differs.append((n, d, m))
    # Mean span 1 with density 0.5: every token adds a sentinel, the Flax search overshoots by one.
    assert (512, 0.5, 1.0) in differs
    assert t5_span_corruption_lengths(512, 0.5, 1.0) == (510, 512)
    assert flax_example_helper(512, 0.5, 1.0) == (512, 513)


@pytest.mark.parametrize(
    ("n", "density", "mean"), [(512, 0.15, 3.0), (128, 0.15, 3.0), (256, 0.3, 2.0), (64, 0.1, 1.0)]
)
def test_rows_of_the_raw_length_give_the_promised_shapes(t5_tokenizer, stream, n, density, mean):
    raw_length, targets_length = t5_span_corruption_lengths(n, density, mean)
    rows = rows_of(stream, [raw_length] * 8)
    collator = DataCollatorForT5SpanCorruption(t5_tokenizer, noise_density=density, mean_noise_span_length=mean)
    batch = collator([{"input_ids": r} for r in rows])
    assert tuple(batch["input_ids"].shape) == (8, n)
    assert tuple(batch["labels"].shape) == (8, targets_length)
    assert bool(batch["attention_mask"].all()) and bool((batch["labels"] != -100).all())


def test_counts_use_float32_like_tensorflow(ascending_tokenizer):
    """T5 computes round(L * density) on float32 tensors: 95 * 0.3 is 28.4999… in float64 but 28.500001 in
    float32, so TensorFlow's mask has 29 noise tokens (and round(29 / 3) = 10 spans), not 28 and 9."""
    collator = DataCollatorForT5SpanCorruption(ascending_tokenizer, noise_density=0.3, mean_noise_span_length=3.0)
    batch = collator([{"input_ids": [200] * 95}])
    assert int((batch["labels"] != -100).sum()) == 29 + 10 + 1
    assert batch["input_ids"].shape[1] == 95 - 29 + 10 + 1
    assert round(95 * 0.3) == 28 and np.rint(np.float32(95) * np.float32(0.3)) == 29


def test_seed_reproducible(t5_tokenizer, stream):
    features = [{"input_ids": r} for r in rows_of(stream, [100, 80, 120])]

    def run(seed):
        collator = DataCollatorForT5SpanCorruption(t5_tokenizer, seed=seed)
        return [collator(features)["input_ids"] for _ in range(3)]

    first, again, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0], first[1])  # consecutive batches differ


def test_errors_name_the_argument(t5_tokenizer, bart_tokenizer, ascending_tokenizer, stream):
    for density in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="noise_density"):
            DataCollatorForT5SpanCorruption(t5_tokenizer, noise_density=density)
    with pytest.raises(ValueError, match="mean_noise_span_length"):
        DataCollatorForT5SpanCorruption(t5_tokenizer, mean_noise_span_length=0.5)
    with pytest.raises(ValueError, match="inputs_length"):
        t5_span_corruption_lengths(1)
    with pytest.raises(ValueError, match="noise_density"):
        t5_span_corruption_lengths(512, noise_density=0.0)
    with pytest.raises(ValueError, match="sentinel"):
        DataCollatorForT5SpanCorruption(bart_tokenizer)  # has eos and pad, no <extra_id_*>
    collator = DataCollatorForT5SpanCorruption(t5_tokenizer)
    with pytest.raises(ValueError, match=r"features\[1\].*no token"):
        collator([{"input_ids": stream[:10]}, {"input_ids": []}])
    with pytest.raises(ValueError, match=r"features\[0\].*only an EOS"):
        collator([{"input_ids": [t5_tokenizer.eos_token_id]}, {"input_ids": stream[:10]}])
    with pytest.raises(ValueError, match="Every row .* empty"):
        collator([{"input_ids": []}, {"input_ids": []}])
    with pytest.raises(ValueError, match="empty"):
        collator([])
    with pytest.raises(ValueError, match="input_ids"):
        collator([{"ids": stream[:10]}])
    with pytest.raises(ValueError, match="sentinels"):  # 100 sentinels; 600 tokens at 0.3/1.0 need 180 spans
        DataCollatorForT5SpanCorruption(ascending_tokenizer, noise_density=0.3, mean_noise_span_length=1.0)(
            [{"input_ids": [50] * 600}]
        )
    with pytest.raises(ValueError, match="mean_noise_span_length"):  # 9 noise spans, 1 non-noise token
        DataCollatorForT5SpanCorruption(t5_tokenizer, noise_density=0.9, mean_noise_span_length=1.0)(
            [{"input_ids": stream[:10]}]
        )


def t5_noise_mask(length: int, density: float, mean: float) -> list[bool]:
    """random_spans_noise_mask for rows too short to split at random: T5 pads the length to 2 and cuts back."""
    work = max(length, 2)
    noise, spans = t5_counts(work, density, mean)
    assert spans == 1  # one noise span: the segmentation is fixed, non-noise first
    return ([False] * (work - noise) + [True] * noise)[:length]


def test_one_token_row_is_an_example_as_in_t5(t5_tokenizer, stream):
    """T5 turns a 1-token row into inputs `tok EOS` and targets `<extra_id_0> EOS` (its noise mask, computed for
    2 tokens and cut to 1, has no noise); the other rows of the batch are corrupted as usual."""
    tok = t5_tokenizer
    assert t5_noise_mask(1, 0.15, 3.0) == [False]
    eos, first_sentinel = tok.eos_token_id, sentinel_ids(tok)[0]
    rows = [stream[:1], stream[5:25], stream[40:41], stream[50:52]]
    batch = DataCollatorForT5SpanCorruption(tok, seed=0)([{"input_ids": row} for row in rows])
    sentinels = {token: index for index, token in enumerate(sentinel_ids(tok))}
    for index, row in enumerate(rows):
        inputs = unpadded(batch["input_ids"][index], tok.pad_token_id)
        targets = unpadded(batch["labels"][index], -100)
        if len(row) == 1:
            assert inputs == [row[0], eos] and targets == [first_sentinel, eos]
        else:
            assert reconstruct(inputs, targets, sentinels) == row
    assert batch["attention_mask"][0].tolist()[:3] == [1, 1, 0]


def test_a_final_eos_is_not_doubled(t5_tokenizer, stream):
    """A row tokenized with its EOS (`tokenizer(text)`) gives the same example as the raw row: one EOS each."""
    eos = t5_tokenizer.eos_token_id
    rows = [stream[:30], stream[100:157], stream[200:201]]
    raw = DataCollatorForT5SpanCorruption(t5_tokenizer, seed=4)([{"input_ids": row} for row in rows])
    ended = DataCollatorForT5SpanCorruption(t5_tokenizer, seed=4)([{"input_ids": [*row, eos]} for row in rows])
    assert all(torch.equal(raw[key], ended[key]) for key in raw)
    for index in range(len(rows)):
        assert unpadded(ended["input_ids"][index], t5_tokenizer.pad_token_id).count(eos) == 1


def test_ids_outside_the_vocabulary_are_errors_naming_the_row(t5_tokenizer, stream):
    """Like the BERT and BART collators: a -100 (label padding fed as input) used to become an ignored label."""
    collator = DataCollatorForT5SpanCorruption(t5_tokenizer)
    for bad in (-100, -1, len(t5_tokenizer)):
        with pytest.raises(ValueError, match=rf"features\[1\].*{bad}.*vocabulary"):
            collator([{"input_ids": stream[:20]}, {"input_ids": [*stream[:10], bad, *stream[10:20]]}])


def test_numpy_scalar_settings_act_as_the_numbers_they_print_as(t5_tokenizer, stream):
    features = [{"input_ids": row} for row in rows_of(stream, [95, 120, 568])]
    plain = DataCollatorForT5SpanCorruption(t5_tokenizer, noise_density=0.3, mean_noise_span_length=3.0, seed=1)
    numpy = DataCollatorForT5SpanCorruption(
        t5_tokenizer, noise_density=np.float32(0.3), mean_noise_span_length=np.int64(3), seed=1
    )
    expected, got = plain(features), numpy(features)
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert t5_span_corruption_lengths(512, np.float64(0.15), np.float32(3.0)) == (568, 114)


def test_tokenizer_without_eos_or_pad(t5_tokenizer):
    no_eos = t5_tokenizer.__class__(tokenizer_object=t5_tokenizer.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(ValueError, match="eos_token"):
        DataCollatorForT5SpanCorruption(no_eos)
    no_pad = t5_tokenizer.__class__(tokenizer_object=t5_tokenizer.backend_tokenizer, eos_token="</s>")
    with pytest.raises(ValueError, match="pad_token"):
        DataCollatorForT5SpanCorruption(no_pad)
    with pytest.raises(TypeError, match="tokenizer"):
        DataCollatorForT5SpanCorruption("t5-small")
