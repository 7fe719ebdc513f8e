"""Bad-batch forensics end to end: find the samples that broke a run, diagnose it, leave them out of a rerun.

A tiny BERT masked-language model trains under `StabilityTrainer` on sentences of the embedded corpus with a
WordPiece tokenizer trained on the fly (offline, CPU, a few seconds). **The fault is injected**: real text cannot
make a healthy model NaN, so three chosen rows start with a token no other row holds (``[POISON]``), and a forward
hook on the input embeddings turns every row holding that token NaN. The fault travels with the data, as a corrupt
sample does: whichever batch holds a poisoned row has a NaN loss and NaN gradients, and StabilityTrainer skips
that step. Over two epochs each poisoned row is skipped twice, so the doctor's ``recurring_samples`` rule fires.

The script then prints what a user would run next:

    hf-stability report OUTPUT_DIR --bad-samples   # the samples by index, their events and text
    hf-stability doctor OUTPUT_DIR                 # the diagnosis and the remedy

and reruns with ``exclude_samples`` set to the run's own ``stability_bad_samples.json``: no step is skipped.

    python examples/bad_samples.py --output_dir out/bad_samples
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import torch
from transformers import BertConfig, BertForMaskedLM, default_data_collator

from hf_stability import StabilityConfig, StabilityTrainer
from hf_stability.corpus import default_corpus, split_sentences, train_tokenizer
from hf_stability.sample_report import write_data_reference

POISON = "[POISON]"
SEQ_LEN = 32


def build_rows(tokenizer, rows: int, poisoned: set[int]) -> datasets.Dataset:
    """``rows`` sentences of the embedded corpus with a fixed MLM mask (every 5th token from position 1 becomes
    ``[MASK]`` and a label: every row has labels, and the mask never hides the poison); rows ``poisoned`` start
    with `POISON` instead of ``[CLS]``."""
    sentences = [s for doc in default_corpus() for s in split_sentences(doc) if len(s.split()) >= 6][:rows]
    encoded = tokenizer(sentences, max_length=SEQ_LEN, truncation=True, padding="max_length")
    poison_id = tokenizer.convert_tokens_to_ids(POISON)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for index, (ids, attention) in enumerate(zip(encoded["input_ids"], encoded["attention_mask"], strict=True)):
        ids, labels = list(ids), [-100] * SEQ_LEN
        for position in range(1, sum(attention) - 1, 5):
            labels[position], ids[position] = ids[position], tokenizer.mask_token_id
        if index in poisoned:
            ids[0] = poison_id
        columns["input_ids"].append(ids)
        columns["attention_mask"].append(list(attention))
        columns["labels"].append(labels)
    return datasets.Dataset.from_dict(columns)


def poison_embeddings(model: torch.nn.Module, token_id: int) -> None:
    """The injected fault: rows holding ``token_id`` get NaN input embeddings, hence a NaN loss for their batch."""

    def hook(module, args, output):
        rows = (args[0] == token_id).any(dim=-1)[:, None, None]
        return torch.where(rows, torch.full_like(output, float("nan")), output)

    model.get_input_embeddings().register_forward_hook(hook)


def train(output_dir: Path, tokenizer, rows: datasets.Dataset, epochs: int, exclude: str | None) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ_LEN, pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM(config)
    poison_embeddings(model, tokenizer.convert_tokens_to_ids(POISON))
    args = StabilityConfig(
        str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=6, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        **({"exclude_samples": exclude} if exclude else {}),
    )
    StabilityTrainer(model, args, train_dataset=rows, data_collator=default_data_collator).train()


def hf_stability(*argv: str) -> None:
    """Run the ``hf-stability`` command line (as ``python -m hf_stability.cli``) and print what it prints."""
    print(f"$ hf-stability {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, "-m", "hf_stability.cli", *argv], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="out/bad_samples", help="Where the run and its rerun write.")
    parser.add_argument("--rows", type=int, default=96, help="Training rows (batches of 8).")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs (>= 2: a poisoned sample recurs).")
    parser.add_argument("--poisoned", default="7,42,77", help="Comma-separated indices of the poisoned rows.")
    args = parser.parse_args()
    poisoned = {int(index) for index in args.poisoned.split(",")}
    # hf-stability's own INFO lines (the rerun's "Excluding 3 sample(s) ..."); transformers' stay at warnings.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_stability").setLevel(logging.INFO)
    if not all(0 <= index < args.rows for index in poisoned):
        parser.error(f"--poisoned: every index must be in 0..{args.rows - 1}, got {args.poisoned}")

    out = Path(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tokenizer = train_tokenizer(default_corpus(), "bert", vocab_size=1000, model_max_length=SEQ_LEN)
    tokenizer.add_tokens([POISON])
    rows = build_rows(tokenizer, args.rows, poisoned)
    # So that `report --bad-samples` can print each sample's text (the recipes do this themselves).
    tokenizer.save_pretrained(str(out))
    write_data_reference(out, rows, str(out))

    train(out, tokenizer, rows, args.epochs, exclude=None)
    skips = [e for e in map(json.loads, (out / "stability_events.jsonl").read_text().splitlines())
             if e["event"] == "skip"]
    print(f"run: {len(skips)} skipped step(s); poisoned rows {sorted(poisoned)}", flush=True)
    hf_stability("report", str(out), "--bad-samples")
    hf_stability("doctor", str(out))

    rerun = out / "rerun"
    train(rerun, tokenizer, rows, args.epochs, exclude=str(out / "stability_bad_samples.json"))
    events_file = rerun / "stability_events.jsonl"
    rerun_events = [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.exists() else []
    print(f"rerun with --exclude_samples {out / 'stability_bad_samples.json'}: "
          f"{sum(e['event'] == 'skip' for e in rerun_events)} skipped step(s)", flush=True)


if __name__ == "__main__":
    main()
