"""Pre-train BART with fairseq's denoising objective (span infilling + sentence permutation).

Runs with no arguments on an offline machine: the embedded corpus, a byte-level BPE tokenizer trained on
it, a tiny model. Everything is a flag (``--help``) or a ``--config x.yaml`` key:

    python recipes/bart_pretrain.py
    accelerate launch recipes/bart_pretrain.py --train_file my_corpus.txt --max_steps 2000
    torchrun --nproc_per_node 2 recipes/bart_pretrain.py --config my_run.yaml --report_to wandb
"""

from __future__ import annotations

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
    insert_ratio: float = field(default=0.0, metadata={"help": "Fraction of random tokens inserted."})


def model_config(tokenizer, data_args, base=None) -> BartConfig:
    """A tiny BART (2+2 layers, width 64) unless ``--model_config_name`` gave ``base``; fitted to the tokenizer."""
    config = base or BartConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_position_embeddings=data_args.max_seq_length,
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
    defaults={"output_dir": "outputs/bart-pretrain"},
)

if __name__ == "__main__":
    main(BART)
