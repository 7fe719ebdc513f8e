"""`DataCollatorForT5SpanCorruption` in a real `Trainer`: a tiny T5 takes steps on its batches."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import T5Config, T5ForConditionalGeneration

from hf_stability.collators import DataCollatorForT5SpanCorruption
from tests.integration.collators.trainer_check import assert_trainer_steps


def test_trainer_steps_with_tiny_t5(t5_tokenizer, corpus, tmp_path):
    # Raw rows of corpus token ids, no special tokens (the collator adds EOS).
    specials = set(t5_tokenizer.all_special_ids)
    ids = [i for doc in corpus[:30] for i in t5_tokenizer(doc, add_special_tokens=False).input_ids if i not in specials]
    rows = [ids[start : start + 60] for start in range(0, 16 * 60, 60)]
    config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    assert_trainer_steps(
        T5ForConditionalGeneration(config),
        Dataset.from_dict({"input_ids": rows}),
        DataCollatorForT5SpanCorruption(t5_tokenizer, seed=0),
        tmp_path,
    )
