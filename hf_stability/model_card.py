"""Model cards for pre-training runs: one Jinja template per objective, filled from the run's own figures.

The templates live in ``hf_stability/model_cards/`` (shipped as package data) and are rendered with
`huggingface_hub.ModelCard.from_template`. Sections shared by every objective (hyper-parameters, final
metrics, stability) are built here as Markdown, so the templates only describe their objective.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainingArguments

from hf_stability.report import PLOT_FILENAME, RunRecord

TEMPLATES_DIR = Path(__file__).parent / "model_cards"
OBJECTIVES = ("bert", "bart", "t5")
CARD_FILENAME = "README.md"


def template_path(objective: str) -> Path:
    """The Jinja template of an objective (``"bert"``, ``"bart"`` or ``"t5"``)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
    return TEMPLATES_DIR / f"{objective}.md"


def write_model_card(
    output_dir: str | os.PathLike,
    objective: str,
    *,
    args: TrainingArguments,
    run: RunRecord,
    model_class: str,
    num_parameters: int,
    model_config: Mapping[str, Any],
    dataset: str,
    tokenizer: str,
    metrics: Mapping[str, Any],
    command: str,
) -> Path:
    """Render the objective's card into ``<output_dir>/README.md`` and return its path."""
    card_data = ModelCardData(
        language="en",
        library_name="transformers",
        tags=["hf-stability", "pretraining", objective],
        pipeline_tag="fill-mask" if objective == "bert" else "text2text-generation",
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(objective)),
        model_name=Path(output_dir).name,
        model_class=model_class,
        num_parameters=f"{num_parameters:,}",
        model_config=_table(model_config, "setting"),
        dataset=dataset,
        tokenizer=tokenizer,
        command=command,
        world_size=args.world_size,
        hyperparameters=_table(_hyperparameters(args), "hyper-parameter"),
        metrics=_table({key: _number(value) for key, value in metrics.items()}, "metric"),
        stability=_stability_section(run, args),
        plot_filename=PLOT_FILENAME,
    )
    path = Path(output_dir) / CARD_FILENAME
    card.save(path)
    return path


def _hyperparameters(args: TrainingArguments) -> dict[str, Any]:
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    rows = {
        "learning_rate": args.learning_rate,
        "optimizer": f"{_plain(args.optim)} (betas=({args.adam_beta1}, {args.adam_beta2}), eps={args.adam_epsilon})",
        "weight_decay": args.weight_decay,
        "lr_scheduler": f"{_plain(args.lr_scheduler_type)} {args.lr_scheduler_kwargs or ''}".strip(),
        "warmup_steps": args.warmup_steps,
        "max_grad_norm": args.max_grad_norm,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "max_steps": args.max_steps,
        "precision": precision,
        "seed": args.seed,
    }
    for name in (
        "skip_nonfinite",
        "spike_rollback",
        "spike_metric",
        "spike_sigma",
        "spike_window",
        "snapshot_interval",
    ):
        if hasattr(args, name):
            rows[name] = getattr(args, name)
    return rows


def _stability_section(run: RunRecord, args: TrainingArguments) -> str:
    figures = run.summary()
    scale = (
        f"{figures['loss_scale_min']:g} to {figures['loss_scale_max']:g}"
        if figures["loss_scale_min"] is not None
        else "no grad scaler (fp32 or bf16 training)"
        if not args.fp16
        else "not logged"
    )
    lines = [
        f"- Skipped steps (non-finite gradients): **{figures['skipped_steps']}**",
        f"- Rollbacks after loss spikes: **{figures['rollbacks']}**",
        f"- Loss-scale range: {scale}",
    ]
    if figures["max_grad_norm"] is not None:
        lines.append(f"- Largest logged gradient norm: {figures['max_grad_norm']:.4g}")
    if run.events:
        lines += ["", "| step | event | reason | restored step |", "|---|---|---|---|"]
        for event in run.events:
            lines.append(
                f"| {event['step']} | {event['event']} | {event['reason']} | {event.get('restored_step', '')} |"
            )
    else:
        lines += ["", "No skip or rollback happened in this run."]
    if figures["superseded"]:
        names = ", ".join(f"`{name}`" for name in figures["superseded"])
        lines += ["", f"Events of an earlier run in this directory, or of steps replayed after a resume, were moved "
                      f"aside and are not counted here: {names}."]
    return "\n".join(lines)


def _table(rows: Mapping[str, Any], header: str) -> str:
    lines = [f"| {header} | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """An enum member's value (``adamw_torch_fused``), anything else unchanged."""
    return getattr(value, "value", value)


def _number(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value
