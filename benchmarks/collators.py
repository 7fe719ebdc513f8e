"""Samples/s of each hf-stability collator against `transformers.DataCollatorForLanguageModeling`.

All collators see the same 512-token rows (batch 64) in one process, so the ratios are comparable
on any machine. Run: ``python benchmarks/collators.py [--batches 30]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling

from hf_stability.corpus import default_corpus, train_tokenizer

SEQ_LEN = 512
BATCH = 64


def token_rows(tokenizer, length: int, count: int, add_special_tokens: bool) -> list[list[int]]:
    """`count` rows of exactly `length` ids cut from the embedded corpus, wrapped in CLS/SEP (or bos/eos) if asked."""
    stream = [i for doc in default_corpus() for i in tokenizer(doc, add_special_tokens=False).input_ids]
    body = length - 2 if add_special_tokens else length
    rows = []
    for index in range(count):
        start = (index * 997) % (len(stream) - body)
        ids = stream[start : start + body]
        rows.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id] if add_special_tokens else ids)
    return rows


def samples_per_second(collate: Callable, features: list[dict], batches: int) -> float:
    collate(features[:BATCH])  # warm-up
    start = time.perf_counter()
    for index in range(batches):
        offset = (index * BATCH) % (len(features) - BATCH + 1)
        collate(features[offset : offset + BATCH])
    return batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=30, help="batches timed per collator")
    args = parser.parse_args()
    torch.set_num_threads(1)
    np.random.seed(0)
    corpus = default_corpus()

    bert = train_tokenizer(corpus, "bert", vocab_size=8000)
    bert_rows = [{"input_ids": ids} for ids in token_rows(bert, SEQ_LEN, 4 * BATCH, add_special_tokens=True)]
    baseline = samples_per_second(DataCollatorForLanguageModeling(bert, mlm_probability=0.15), bert_rows, args.batches)
    results: list[tuple[str, float]] = [("transformers DataCollatorForLanguageModeling (MLM)", baseline)]

    for name, collate, features in cases(corpus, bert, bert_rows):
        results.append((name, samples_per_second(collate, features, args.batches)))

    print(f"\n{SEQ_LEN}-token rows, batch {BATCH}, {args.batches} batches each, 1 thread\n")
    print("| collator | samples/s | vs transformers MLM |\n|---|---:|---:|")
    for name, rate in results:
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.1f}x |")


def cases(corpus: list[str], bert, bert_rows: list[dict]) -> list[tuple[str, Callable, list[dict]]]:
    """The project's collators, each with the features it expects (filled in per objective)."""
    from hf_stability.collators import DataCollatorForBertPretraining

    found: list[tuple[str, Callable, list[dict]]] = []
    # BERT MLM / NSP: the same rows; the NSP row adds the segment ids and labels BertForPreTraining needs.
    nsp_rows = [
        {**row, "token_type_ids": [0] * (SEQ_LEN // 2) + [1] * (SEQ_LEN // 2), "next_sentence_label": i % 2}
        for i, row in enumerate(bert_rows)
    ]
    found += [
        ("hf-stability BERT MLM, exact count", DataCollatorForBertPretraining(bert, seed=0), bert_rows),
        ("hf-stability BERT MLM, exact count + NSP fields", DataCollatorForBertPretraining(bert, seed=0), nsp_rows),
        (
            "hf-stability BERT MLM, Bernoulli (transformers' draw)",
            DataCollatorForBertPretraining(bert, masking="bernoulli", seed=0),
            bert_rows,
        ),
        (
            "hf-stability BERT MLM, whole-word, exact count",
            DataCollatorForBertPretraining(bert, whole_word_mask=True, seed=0),
            bert_rows,
        ),
    ]
    found += seq2seq_cases(corpus)
    return found


def seq2seq_cases(corpus: list[str]) -> list[tuple[str, Callable, list[dict]]]:
    """BART on 512-token rows `<s> … </s>`; T5 on raw rows of 568 tokens (-> 512 inputs, 114 labels)."""
    from hf_stability.collators import (
        DataCollatorForBartDenoising,
        DataCollatorForT5SpanCorruption,
        t5_span_corruption_lengths,
    )

    bart = train_tokenizer(corpus, "bart", vocab_size=8000)
    bart_rows = [{"input_ids": ids} for ids in token_rows(bart, SEQ_LEN, 4 * BATCH, add_special_tokens=True)]
    t5 = train_tokenizer(corpus, "t5", vocab_size=8000)
    raw_length, _ = t5_span_corruption_lengths(SEQ_LEN)
    t5_rows = [{"input_ids": ids} for ids in token_rows(t5, raw_length, 4 * BATCH, add_special_tokens=False)]
    every_noise = DataCollatorForBartDenoising(bart, insert_ratio=0.1, rotate_ratio=0.5, seed=0)
    return [
        (
            "hf-stability BART denoising (infilling 0.3 + sentence permutation)",
            DataCollatorForBartDenoising(bart, seed=0),
            bart_rows,
        ),
        ("hf-stability BART denoising, + insertion 0.1 + rotation 0.5", every_noise, bart_rows),
        (
            f"hf-stability T5 span corruption ({raw_length} raw -> {SEQ_LEN} inputs)",
            DataCollatorForT5SpanCorruption(t5, seed=0),
            t5_rows,
        ),
    ]


if __name__ == "__main__":
    main()
