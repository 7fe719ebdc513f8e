"""Pre-train BERT with masked language modelling + next-sentence prediction (`BertForPreTraining`).

Runs with no arguments on an offline machine: the embedded corpus, a WordPiece tokenizer trained on it,
a tiny model. Everything is a flag (``--help``) or a ``--config x.yaml`` key:

    python recipes/bert_pretrain.py
    accelerate launch recipes/bert_pretrain.py --train_file my_corpus.txt --whole_word_mask
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import BertConfig, BertForPreTraining

from hf_stability.collators import DataCollatorForBertPretraining
from hf_stability.nsp_examples import nsp_rows
from hf_stability.pretrain import Objective, main


@dataclass
class BertPretrainingArguments:
    """NSP pairing and MLM masking; defaults are Google BERT's."""

    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens chosen for prediction."})
    mask_replace_prob: float = field(default=0.8, metadata={"help": "Chosen tokens replaced by [MASK]."})
    random_replace_prob: float = field(default=0.1, metadata={"help": "Chosen tokens replaced by a random token."})
    whole_word_mask: bool = field(default=False, metadata={"help": "Choose whole words instead of tokens."})
    short_seq_prob: float = field(default=0.1, metadata={"help": "Probability of a shorter random target length."})
    nsp_probability: float = field(default=0.5, metadata={"help": "Probability that segment B is a random one."})


def model_config(tokenizer, data_args, objective_args, base=None) -> BertConfig:
    """A tiny BERT (2 layers, width 64) unless ``--model_config_name`` gave ``base``; fitted to the tokenizer."""
    config = base or BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=data_args.max_seq_length,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.update({"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id})
    return config


def make_rows(tokenizer, data_args, objective_args: BertPretrainingArguments, seed: int):
    """Documents → sentences → ``[CLS] A [SEP] B [SEP]`` pairs with token types and NSP labels (`nsp_dataset`'s map)."""
    return nsp_rows(
        tokenizer,
        max_seq_length=data_args.max_seq_length,
        short_seq_prob=objective_args.short_seq_prob,
        nsp_probability=objective_args.nsp_probability,
        seed=seed,
    )


def make_collator(tokenizer, objective_args: BertPretrainingArguments, seed: int) -> DataCollatorForBertPretraining:
    return DataCollatorForBertPretraining(
        tokenizer,
        mlm_probability=objective_args.mlm_probability,
        mask_replace_prob=objective_args.mask_replace_prob,
        random_replace_prob=objective_args.random_replace_prob,
        whole_word_mask=objective_args.whole_word_mask,
        seed=seed,
    )


BERT = Objective(
    name="bert",
    model_class=BertForPreTraining,
    model_config=model_config,
    make_rows=make_rows,
    make_collator=make_collator,
    arguments=BertPretrainingArguments,
    defaults={"output_dir": "outputs/bert-pretrain"},
)

if __name__ == "__main__":
    main(BERT)
