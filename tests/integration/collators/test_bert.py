"""`DataCollatorForBertPretraining` in a real `Trainer`: steps train, and the NSP columns reach only the NSP model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

from hf_stability.collators import DataCollatorForBertPretraining, nsp_dataset
from tests.integration.collators.trainer_check import assert_trainer_steps


@pytest.fixture(scope="module")
def nsp_examples(bert_tokenizer, corpus):
    return nsp_dataset(Dataset.from_dict({"text": corpus[:12]}), bert_tokenizer, max_seq_length=64, seed=0)


@pytest.mark.parametrize("model_class", [BertForPreTraining, BertForMaskedLM])
def test_trainer_steps_with_the_collator(bert_tokenizer, nsp_examples, tmp_path, model_class):
    config = BertConfig(
        vocab_size=len(bert_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=bert_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    collator = DataCollatorForBertPretraining(bert_tokenizer, seed=0)
    trainer = assert_trainer_steps(model_class(config), nsp_examples, collator, tmp_path, batch_size=8)
    # Trainer drops the columns the model's forward does not take: NSP labels only reach BertForPreTraining.
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("next_sentence_label" in batch) == (model_class is BertForPreTraining)
    assert "token_type_ids" in batch
