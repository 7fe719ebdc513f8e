"""`DataCollatorForBartDenoising` in a real `Trainer`: a tiny BART takes steps on its batches."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import BartConfig, BartForConditionalGeneration

from hf_stability.collators import DataCollatorForBartDenoising
from tests.integration.collators.trainer_check import assert_trainer_steps


def test_trainer_steps_with_tiny_bart(bart_tokenizer, corpus, tmp_path):
    tok = bart_tokenizer
    # `bos … eos` rows of real text, each starting at a document's first word.
    rows = [[tok.bos_token_id, *tok(" " + doc, add_special_tokens=False).input_ids[:120], tok.eos_token_id]
            for doc in corpus[:16]]
    config = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    assert_trainer_steps(
        BartForConditionalGeneration(config),
        Dataset.from_dict({"input_ids": rows}),
        DataCollatorForBartDenoising(tok, seed=0),
        tmp_path,
    )
