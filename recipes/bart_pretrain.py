"""Pre-train BART with fairseq's denoising objective (span infilling + sentence permutation).

Runs with no arguments on an offline machine: the embedded corpus, a byte-level BPE tokenizer trained on
it, a tiny model. Everything is a flag (``--help``) or a ``--config x.yaml`` key:

    python recipes/bart_pretrain.py
    accelerate launch recipes/bart_pretrain.py --train_file my_corpus.txt --max_steps 2000
    torchrun --nproc_per_node 2 recipes/bart_pretrain.py --config my_run.yaml --report_to wandb
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import BartConfig, BartForConditionalGeneration

from hf_stability.collators import DataCollatorForBartDenoising
from hf_stability.pretrain import Objective, main, pack_token_streams


@dataclass
class BartDenoisingArguments:
    """Noise of `DataCollatorForBartDenoising`; defaults are fairseq's released `bart.large` settings."""

    mask_ratio: float = field(default=0.3, metadata={"help": "Fraction of words masked by span infilling."})
    random_ratio: float = field(default=0.1, metadata={"help": "Fraction of masks replaced by a random token."})
    poisson_lambda: float = field(default=3.5, metadata={"help": "Mean span length of infilling."})
    permute_sentence_ratio: float = field(default=1.0, metadata={"help": "Fraction of sentences permuted."})
    rotate_ratio: float = field(default=0.0, metadata={"help": "Probability of rotating a row."})
    insert_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of random tokens inserted; rows grow by ceil(max_seq_length * insert_ratio) tokens, "
            "and the tiny model gets that many more positions."
        },
    )


def input_length(max_seq_length: int, objective_args: BartDenoisingArguments) -> int:
    """The longest noised row from a row of ``max_seq_length`` tokens: insertion adds ``ceil(length * insert_ratio)``.

    Sentence permutation and rotation keep the length, and a masked span becomes at most one ``<mask>``. Only
    zero-length spans (an inserted ``<mask>`` each, rare unless ``poisson_lambda`` is small) can lengthen a row
    further, and only when they outnumber the tokens the other spans removed; the recipe's position guard
    reports such a batch by name. fairseq likewise gives the model more positions than a sample has tokens
    (``max_source_positions`` 1024 for 512-token samples) rather than cutting the noised rows.
    """
    return max_seq_length + math.ceil(max_seq_length * objective_args.insert_ratio)


def model_config(tokenizer, data_args, objective_args: BartDenoisingArguments, base=None) -> BartConfig:
    """A tiny BART (2+2 layers, width 64) unless ``--model_config_name`` gave ``base``; fitted to the tokenizer.

    The tiny model has a position for every token the noise can produce (`input_length`).
    """
    config = base or BartConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_position_embeddings=input_length(data_args.max_seq_length, objective_args),
        dropout=0.0,
        use_cache=False,
    )
    config.update(
        {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_bos_token_id": None,
            "forced_eos_token_id": tokenizer.eos_token_id,
        }
    )
    return config


def make_rows(tokenizer, data_args, objective_args, seed):
    """Documents → ``<s> … </s>`` rows of ``max_seq_length`` tokens cut from the documents' token stream."""

    def rows(batch: dict) -> dict:
        token_lists = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        blocks = pack_token_streams(token_lists, data_args.max_seq_length - 2)
        return {"input_ids": [[tokenizer.bos_token_id, *block, tokenizer.eos_token_id] for block in blocks]}

    return rows


def make_collator(tokenizer, objective_args: BartDenoisingArguments, seed: int) -> DataCollatorForBartDenoising:
    return DataCollatorForBartDenoising(
        tokenizer,
        mask_ratio=objective_args.mask_ratio,
        random_ratio=objective_args.random_ratio,
        poisson_lambda=objective_args.poisson_lambda,
        permute_sentence_ratio=objective_args.permute_sentence_ratio,
        rotate_ratio=objective_args.rotate_ratio,
        insert_ratio=objective_args.insert_ratio,
        seed=seed,
    )


BART = Objective(
    name="bart",
    model_class=BartForConditionalGeneration,
    model_config=model_config,
    make_rows=make_rows,
    make_collator=make_collator,
    arguments=BartDenoisingArguments,
    input_length=input_length,
    defaults={"output_dir": "outputs/bart-pretrain"},
)

if __name__ == "__main__":
    main(BART)
