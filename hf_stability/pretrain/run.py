"""The shared body of the pre-training recipes; a recipe only supplies its :class:`Objective`.

One run: parse arguments → load documents → tokenizer (trained on the training text unless given) →
model (tiny by default) → pack rows → `StabilityTrainer` → evaluate → save model, tokenizer, metrics,
``trainer_state.json``, ``training_curves.png`` and a model card into ``output_dir``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoTokenizer,
    EvalPrediction,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.trainer_utils import TrainOutput

from hf_stability._compat import load_finished_checkpoint, output_dir
from hf_stability._logging import get_logger
from hf_stability.config import StabilityConfig
from hf_stability.corpus import TokenizerKind, train_tokenizer
from hf_stability.metrics import metric_path
from hf_stability.model_card import training_precision
from hf_stability.pretrain.arguments import DataArguments, ModelArguments, make_parser, parse_args
from hf_stability.pretrain.data import AnyDataset, describe_source, load_documents, map_documents, take
from hf_stability.pretrain.errors import InputError, exit_on_input_error, input_errors
from hf_stability.report import PLOT_FILENAME
from hf_stability.sample_report import write_data_reference

logger = get_logger("hf_stability.pretrain")

# The seeds' optimisation hygiene (GPT-3 AdamW betas/eps, weight decay 0.1, warmup then cosine decay to
# 10% of the peak, clipping at 1.0) plus a size that trains a tiny model visibly in minutes on 2 CPU
# cores. Every value can be overridden by --config YAML and by command-line flags.
RECIPE_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.1,
    "lr_scheduler_type": "cosine_with_min_lr",
    "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
    "warmup_steps": 0.05,
    "max_grad_norm": 1.0,
    "max_steps": 300,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 1,
    "report_to": "none",
    "seed": 42,
}
# The license written into the model card's front matter: the project's own. Edit the card's YAML before
# sharing a model whose training data carries another license.
CARD_LICENSE = "apache-2.0"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Texts a tokenizer trained on the fly sees when the training set is streamed.
STREAMED_TOKENIZER_DOCUMENTS = 10_000


@dataclass(frozen=True)
class Objective:
    """What distinguishes one pre-training recipe from another.

    Attributes:
        name: ``"bert"``, ``"bart"`` or ``"t5"``: the tokenizer family and the model-card template.
        model_class: the `transformers` class trained (e.g. ``BartForConditionalGeneration``).
        model_config: ``(tokenizer, data_args, objective_args, base)`` → the config to train from scratch: ``base``
            (from ``--model_config_name``) or, when ``None``, the recipe's tiny config; either way fitted to the
            tokenizer's vocabulary and special tokens.
        make_rows: ``(tokenizer, data_args, objective_args, seed)`` → a batched `datasets.map` function turning
            ``{"text": [document, ...]}`` into model rows (``input_ids`` and whatever else the collator needs).
        make_collator: ``(tokenizer, objective_args, seed)`` → the data collator.
        arguments: a dataclass of the objective's own flags (added to the parser), or ``None``.
        defaults: recipe-specific argument defaults (e.g. ``output_dir``), applied over `RECIPE_DEFAULTS`.
        input_length: ``(max_seq_length, objective_args)`` → the longest model input the collator makes from a row
            (BART's insertions lengthen rows); ``None``: ``max_seq_length``. The model's positions must cover it.
    """

    name: TokenizerKind
    model_class: type[PreTrainedModel]
    model_config: Callable[[PreTrainedTokenizerBase, DataArguments, Any, PretrainedConfig | None], PretrainedConfig]
    make_rows: Callable[[PreTrainedTokenizerBase, DataArguments, Any, int], Callable[[dict], dict]]
    make_collator: Callable[[PreTrainedTokenizerBase, Any, int], Callable[[list[dict]], dict]]
    arguments: type | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    input_length: Callable[[int, Any], int] | None = None


@exit_on_input_error
def main(objective: Objective, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one pre-training recipe end to end; returns the final train and eval metrics.

    Bad arguments, config or data files (`InputError`) end it before training with one line and exit status 2.
    """
    data_args, model_args, objective_args, training_args = parse_recipe_args(objective, argv)
    _setup_logging(training_args)
    with input_errors():  # launch, checkpoint and streaming settings that cannot work end here, in one line
        _check_world_size(training_args)
        training_args.resume_from_checkpoint = resolve_checkpoint(
            training_args.resume_from_checkpoint, output_dir(training_args)
        )
        if data_args.streaming and training_args.max_steps <= 0:
            raise ValueError("`streaming` needs `max_steps` > 0: a stream has no length to count epochs by.")
    if training_args.resume_from_checkpoint is None:
        _warn_earlier_checkpoints(output_dir(training_args))
    set_seed(training_args.seed)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed

    with training_args.main_process_first(local=False, desc="loading documents"):
        train_documents, eval_documents = load_documents(data_args)
    tokenizer, tokenizer_note = _tokenizer(objective, model_args, data_args, training_args, train_documents)
    with input_errors():  # the collator checks the objective's flags (e.g. `poisson_lambda`)
        collator = objective.make_collator(tokenizer, objective_args, seed)
    model = _model(objective, model_args, data_args, objective_args, tokenizer)
    collator = PositionGuard(collator, getattr(model.config, "max_position_embeddings", None), objective.name)
    # A trained-on-the-fly tokenizer knows no length limit (1e30): `truncation=True` must stop at the model's.
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", None) or data_args.max_seq_length
    make_rows = objective.make_rows(tokenizer, data_args, objective_args, seed)
    with training_args.main_process_first(local=False, desc="packing rows"):
        train_rows = take(
            map_documents(train_documents, make_rows, data_args, "train rows"), data_args.max_train_samples
        )
        eval_rows = None
        if eval_documents is not None:
            eval_rows = take(
                map_documents(eval_documents, make_rows, data_args, "eval rows"), data_args.max_eval_samples
            )
    if isinstance(eval_rows, datasets.Dataset) and len(eval_rows) == 0:
        logger.warning("The validation split yields no complete row; evaluation is skipped.")
        eval_rows = None
    if isinstance(train_rows, datasets.Dataset):
        if len(train_rows) == 0:
            raise InputError(
                f"The training data yields no row of `max_seq_length` {data_args.max_seq_length}: give more text "
                "or a smaller `max_seq_length`."
            )
        logger.info("%d training rows, %s evaluation rows", len(train_rows), len(eval_rows) if eval_rows else 0)

    if training_args.process_index == 0:  # what `hf-stability report --bad-samples` decodes the samples from
        tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path or output_dir(training_args)
        write_data_reference(output_dir(training_args), train_rows, tokenizer_source)

    from hf_stability.trainer import StabilityTrainer

    with training_args.main_process_first(local=False, desc="loading the metric"):
        metric = evaluate.load(metric_path("masked_token_accuracy"), keep_in_memory=True)
    trainer = StabilityTrainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=_metrics_function(metric),
        preprocess_logits_for_metrics=_predictions_and_token_losses,
    )
    # BERT, BART and T5 average their own loss and ignore `num_items_in_batch`; left True, Trainer would
    # multiply their (already averaged) train and eval losses by the number of processes.
    trainer.model_accepts_loss_kwargs = False
    precision, ignored = training_precision(trainer)
    if ignored:
        logger.warning("PRECISION: %s. The model card records what ran.", precision)
    logger.info("Training on %d process(es), world size %d", training_args.world_size, training_args.world_size)
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and 0 < training_args.max_steps <= _checkpoint_step(checkpoint):
        logger.warning("%s already reached max_steps=%d: nothing left to train; writing the run's outputs from it.",
                       checkpoint, training_args.max_steps)
        load_finished_checkpoint(trainer, checkpoint)
        train_result = TrainOutput(trainer.state.global_step, float("nan"), {"epoch": trainer.state.epoch or 0.0})
    else:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    if eval_rows is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    card = _card_details(objective, objective_args, data_args, model_args, tokenizer_note)
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)  # writes the same card (StabilityTrainer.create_model_card), then uploads
    else:
        trainer.create_model_card(**card)
    if trainer.is_world_process_zero():
        logger.info("Wrote the model card and %s to %s", PLOT_FILENAME, training_args.output_dir)
    return metrics


def parse_recipe_args(
    objective: Objective, argv: Sequence[str] | None = None
) -> tuple[DataArguments, ModelArguments, Any, StabilityConfig]:
    """``(data, model, objective, training)`` arguments; objective arguments are ``None`` without a class.

    Defaults, lowest precedence first: the dataclasses, `RECIPE_DEFAULTS`, launch-dependent defaults,
    the objective's own, then ``--config`` YAML and the command line.
    """
    parser = make_parser(objective.arguments)
    parsed = parse_args(parser, argv, {**RECIPE_DEFAULTS, **_launcher_defaults(), **objective.defaults})
    objective_args = parsed[2] if objective.arguments is not None else None
    return parsed[0], parsed[1], objective_args, parsed[-1]


def _launcher_defaults() -> dict[str, Any]:
    """Defaults that depend on the machine: ``use_cpu`` (and no pinned memory) when it has no accelerator.

    Without ``use_cpu``, `TrainingArguments` on a CPU-only machine refuses ``--bf16`` and, under
    ``torchrun``/``accelerate launch``, does not join the process group: every process trains alone.
    """
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    return {} if has_accelerator else {"use_cpu": True, "dataloader_pin_memory": False}


# `--resume_from_checkpoint` values that mean "the newest complete checkpoint in output_dir" / "do not resume".
LATEST_CHECKPOINT = ("latest", "last", "true", "yes")
NO_CHECKPOINT = ("", "false", "no", "none")
# Written by Trainer before trainer_state.json (its last file); any one of them holds the weights.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
)


def resolve_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint directory ``--resume_from_checkpoint`` names, checked complete before anything loads.

    ``latest`` (or ``true``) is the newest *complete* checkpoint in ``output_dir`` (an incomplete one, e.g.
    killed mid-write, is passed over with a warning); a path must exist and be complete. Anything else is a
    one-line ``ValueError`` naming the checkpoint and what is missing, never a raw JSON, file or Hub error.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in NO_CHECKPOINT):
        return None
    if value is True or value.strip().lower() in LATEST_CHECKPOINT:
        found = sorted(_checkpoints(output_dir), reverse=True)
        for _, path in found:
            missing = checkpoint_problem(path)
            if missing is None:
                return path
            logger.warning("Passing over incomplete checkpoint %s: %s.", path, missing)
        raise ValueError(
            f"`--resume_from_checkpoint {value}`: no complete checkpoint-* in {output_dir!r}"
            + (f" (incomplete: {', '.join(os.path.basename(p) for _, p in found)})." if found else ".")
        )
    missing = checkpoint_problem(value)
    if missing is not None:
        raise ValueError(f"`--resume_from_checkpoint` {value!r}: {missing}.")
    return value


def _checkpoint_step(path: str) -> int:
    """The ``global_step`` of a checkpoint `resolve_checkpoint` already found complete."""
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
        return int(json.load(handle)["global_step"])


def checkpoint_problem(path: str) -> str | None:
    """What makes ``path`` unusable as a Trainer checkpoint (``None`` when it is complete)."""
    if not os.path.isdir(path):
        return "no such directory"
    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_path):
        return "trainer_state.json is missing (the checkpoint was not completely written)"
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        return f"trainer_state.json is not valid JSON (cut off mid-write?): {error}"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "trainer_state.json has no global_step"
    names = os.listdir(path)
    # The tokenizer, model config and generation config are read back from the same directory: a damaged one
    # (empty, cut off) would end in a raw JSONDecodeError from inside transformers after the run has started.
    for name in sorted(name for name in names if name.endswith(".json") and name != "trainer_state.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as handle:
                content = json.load(handle)
        except (ValueError, UnicodeDecodeError) as error:
            return f"{name} is not valid JSON (empty or cut off mid-write?): {error}"
        if not isinstance(content, dict):
            return f"{name} is not a JSON object"
    if not any(name in WEIGHT_FILES or name.startswith(("pytorch_model_fsdp", "global_step")) for name in names):
        return f"no model weights (none of {', '.join(WEIGHT_FILES)})"
    return None


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    return [
        (int(match.group(1)), os.path.join(output_dir, name))
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]


def _warn_earlier_checkpoints(output_dir: str) -> None:
    """A run that does not resume is a new run: say so when ``output_dir`` holds an earlier run's checkpoints."""
    names = [os.path.basename(path) for _, path in sorted(_checkpoints(output_dir))]
    if names:
        logger.warning(
            "%s holds checkpoints of an earlier run (%s). This run starts from scratch: its stability events go "
            "to a fresh stability_events.jsonl (the earlier ones are moved aside, not deleted) and its checkpoints "
            "may rotate the earlier ones out (save_total_limit). To continue the earlier run instead, pass "
            "--resume_from_checkpoint latest.",
            output_dir,
            ", ".join(names),
        )


def _check_world_size(training_args: StabilityConfig) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != training_args.world_size:
        raise ValueError(
            f"{launched} processes were launched but the run's world size is {training_args.world_size}: each would "
            "train alone. On CPU pass `--use_cpu true` (or `--ddp_backend gloo`)."
        )


def _setup_logging(training_args: StabilityConfig) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    # The package's logger: the recipe's progress and the trainer's own info lines (e.g. the excluded samples).
    logging.getLogger("hf_stability").setLevel(logging.INFO if training_args.should_log else logging.WARNING)


def _tokenizer(
    objective: Objective,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: StabilityConfig,
    train_documents: AnyDataset,
) -> tuple[PreTrainedTokenizerBase, str]:
    """Load the requested tokenizer, or train one on the training text (rank 0 trains and saves, others load)."""
    checkpoint = training_args.resume_from_checkpoint
    source = (
        model_args.tokenizer_name
        or model_args.model_name_or_path
        or (checkpoint if isinstance(checkpoint, str) else None)
    )
    if source is not None:
        return AutoTokenizer.from_pretrained(source), f"`{source}`"
    with training_args.main_process_first(local=False, desc="training the tokenizer"):
        tokenizer: PreTrainedTokenizerBase
        if training_args.process_index == 0:
            texts = (
                train_documents["text"]
                if not data_args.streaming
                else (row["text"] for row in itertools.islice(train_documents, STREAMED_TOKENIZER_DOCUMENTS))
            )
            tokenizer = train_tokenizer(texts, objective.name, vocab_size=model_args.tokenizer_vocab_size)
            tokenizer.save_pretrained(output_dir(training_args))
        else:
            tokenizer = AutoTokenizer.from_pretrained(output_dir(training_args))
    note = f"{objective.name} family, {len(tokenizer)} tokens, trained on the training text by this run (saved with it)"
    return tokenizer, note


def _model(
    objective: Objective,
    model_args: ModelArguments,
    data_args: DataArguments,
    objective_args: Any,
    tokenizer: PreTrainedTokenizerBase,
) -> PreTrainedModel:
    if model_args.model_name_or_path is not None:
        model = objective.model_class.from_pretrained(model_args.model_name_or_path)
    else:
        base = AutoConfig.from_pretrained(model_args.model_config_name) if model_args.model_config_name else None
        config = objective.model_config(tokenizer, data_args, objective_args, base)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = objective.model_class(config)
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, torch.nn.Embedding) and len(tokenizer) > embeddings.num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    length = data_args.max_seq_length
    with input_errors():
        _check_positions(
            model, length, objective.input_length(length, objective_args) if objective.input_length else length
        )
    return model


def _check_positions(model: PreTrainedModel, length: int, needed: int) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and positions < needed:
        lengthened = (
            f" (rows of {length} tokens grow to {needed} with the objective's noise)" if needed > length else ""
        )
        raise ValueError(
            f"`max_seq_length` {length}{lengthened} exceeds the model's max_position_embeddings {positions}: "
            "lower it, or give the model more positions (`--config_overrides max_position_embeddings=N` from scratch)."
        )


class PositionGuard:
    """Wraps a collator: a batch wider than the model's positions is a `ValueError` naming the setting.

    Without it, such a batch fails deep in the model's position embedding with an `IndexError`.
    """

    def __init__(self, collator: Callable[[list[dict]], dict], positions: int | None, objective: str) -> None:
        self.collator, self.positions, self.objective = collator, positions, objective

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collator(features)
        for key in ("input_ids", "decoder_input_ids"):
            if self.positions is not None and key in batch and batch[key].shape[-1] > self.positions:
                raise ValueError(
                    f"The {self.objective} collator made `{key}` {batch[key].shape[-1]} tokens long, over the model's "
                    f"max_position_embeddings {self.positions}: give the model more positions "
                    f"(`--config_overrides max_position_embeddings=N` from scratch), or lower `max_seq_length` or the "
                    "noise that lengthens rows (BART: `insert_ratio`; a small `poisson_lambda` inserts masks)."
                )
        return batch


def _predictions_and_token_losses(logits: Any, labels: Any) -> tuple[torch.Tensor, ...]:
    """Keep only argmax ids and per-token losses of an eval batch (not the full vocabulary logits).

    The token head is the first output and ``labels`` its first label; a second label (BERT's
    ``next_sentence_label``) pairs with the second output (the NSP logits).
    """
    token_logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    token_labels = labels[0] if isinstance(labels, (tuple, list)) else labels
    token_losses = F.cross_entropy(
        token_logits.float().transpose(1, 2), token_labels, ignore_index=-100, reduction="none"
    )
    outputs: tuple[torch.Tensor, ...] = (token_logits.argmax(-1), token_losses)
    if isinstance(labels, (tuple, list)) and len(labels) > 1:
        outputs += (logits[1].argmax(-1),)
    return outputs


def _metrics_function(metric: evaluate.EvaluationModule) -> Callable[[EvalPrediction], dict[str, float]]:
    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        # EvalPrediction's stubs say `tuple[np.ndarray]` where a tuple of any length arrives (one per output).
        token_predictions, token_losses, *sentence_predictions = prediction.predictions  # type: ignore[misc]
        labels = prediction.label_ids
        token_labels = labels[0] if isinstance(labels, (tuple, list)) else labels
        scores = metric.compute(
            predictions=token_predictions.ravel(), references=token_labels.ravel(), token_losses=token_losses.ravel()
        )
        results = {"masked_token_accuracy": scores["accuracy"], "perplexity": scores["perplexity"]}
        if sentence_predictions:
            results["nsp_accuracy"] = float(np.mean(sentence_predictions[0] == labels[1]))  # type: ignore[misc]
        return results

    return compute_metrics


def _card_details(
    objective: Objective,
    objective_args: Any,
    data_args: DataArguments,
    model_args: ModelArguments,
    tokenizer_note: str,
) -> dict[str, Any]:
    """`StabilityTrainer.create_model_card` keywords describing this recipe run."""
    start = model_args.model_name_or_path
    on_hub = start is not None and not os.path.isdir(start)
    dataset = data_args.dataset_name
    return {
        "language": "en",
        "license": CARD_LICENSE,
        "finetuned_from": start if on_hub else None,
        "dataset": dataset if dataset is not None and not os.path.isdir(dataset) else None,
        "dataset_args": data_args.dataset_config_name,
        "objective": objective.name,
        "objective_args": objective_args,
        "data": describe_source(data_args),
        "tokenizer": tokenizer_note,
        "max_seq_length": data_args.max_seq_length,
        "initialised_from": start,
        "command": shlex.join(sys.argv),
    }
