"""Pre-train T5 with span corruption (noise density 15%, mean span length 3, one sentinel per span).

Runs with no arguments on an offline machine: the embedded corpus, a Unigram tokenizer with sentinels
trained on it, a tiny model. Everything is a flag (``--help``) or a ``--config x.yaml`` key:

    python recipes/t5_pretrain.py
    accelerate launch recipes/t5_pretrain.py --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1

T5's own optimizer settings (Raffel et al. 2020, §3.1.2: Adafactor, learning rate 1/sqrt(max(n, 10^4)),
no weight decay, no gradient-norm clipping, dropout 0 in pre-training):

    python recipes/t5_pretrain.py --optim adafactor --learning_rate 1e-2 --lr_scheduler_type inverse_sqrt \
        --warmup_steps 0 --weight_decay 0 --max_grad_norm 0

Trainer's ``adafactor`` uses factored second moments, no first moment, update clipping at 1.0 and decay
rate -0.8, but fixes ``relative_step=False`` and ``scale_parameter=False`` and takes the LR from the
scheduler (``--lr_scheduler_kwargs '{}'`` drops the recipes' ``min_lr_rate``, which ``inverse_sqrt`` does not
take): ``inverse_sqrt`` with no warm-up gives 1e-2 / sqrt((n + 10^4) / 10^4) = 1/sqrt(n + 10^4), T5's
value at step 0 and for n >> 10^4 (within sqrt(2) in between). The paper's exact schedule is Adafactor's own
relative step (``Adafactor(params, lr=None, relative_step=True)`` with ``AdafactorSchedule``, passed as
``optimizers=``): min(1e-2, 1/sqrt(n)). Skipping, rollback snapshots and telemetry work with both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import T5Config, T5ForConditionalGeneration

from hf_stability.collators import DataCollatorForT5SpanCorruption, t5_span_corruption_lengths
from hf_stability.pretrain import Objective, main, pack_token_streams


@dataclass
class T5SpanCorruptionArguments:
    """Noise of `DataCollatorForT5SpanCorruption`; defaults are T5's."""

    noise_density: float = field(default=0.15, metadata={"help": "Fraction of tokens corrupted."})
    mean_noise_span_length: float = field(default=3.0, metadata={"help": "Mean length of a corrupted span."})


def model_config(tokenizer, data_args, objective_args, base=None) -> T5Config:
    """A tiny T5 (2+2 layers, width 64) unless ``--model_config_name`` gave ``base``; fitted to the tokenizer."""
    config = base or T5Config(
        d_model=64,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        use_cache=False,
    )
    config.update(
        {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }
    )
    return config


def make_rows(tokenizer, data_args, objective_args: T5SpanCorruptionArguments, seed):
    """Documents → raw rows (no EOS) long enough that the corrupted input is exactly ``max_seq_length``."""
    raw_length, _ = t5_span_corruption_lengths(
        data_args.max_seq_length, objective_args.noise_density, objective_args.mean_noise_span_length
    )

    def rows(batch: dict) -> dict:
        token_lists = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": list(pack_token_streams(token_lists, raw_length))}

    return rows


def make_collator(tokenizer, objective_args: T5SpanCorruptionArguments, seed: int) -> DataCollatorForT5SpanCorruption:
    return DataCollatorForT5SpanCorruption(
        tokenizer,
        noise_density=objective_args.noise_density,
        mean_noise_span_length=objective_args.mean_noise_span_length,
        seed=seed,
    )


T5 = Objective(
    name="t5",
    model_class=T5ForConditionalGeneration,
    model_config=model_config,
    make_rows=make_rows,
    make_collator=make_collator,
    arguments=T5SpanCorruptionArguments,
    defaults={"output_dir": "outputs/t5-pretrain"},
)

if __name__ == "__main__":
    main(T5)
