"""Model cards generated from the run itself: what trained, with which settings and precision, and how it went.

`build_model_card` reads a `Trainer` after training — its arguments, accelerator, model, ``log_history``
and ``stability_events.jsonl`` — and fills ``model_cards/card.md``; `StabilityTrainer.create_model_card`
(the `Trainer` hook that ``push_to_hub`` calls) writes it. A pre-training recipe adds its objective's own
settings, rendered into that objective's description (``model_cards/<objective>.md``) so the text states
the values that ran. The YAML front matter is Hub metadata that `huggingface_hub` parses back, including
a ``model-index`` with the held-out metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import transformers
from accelerate.utils import DistributedType
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import Trainer

from hf_stability._compat import output_dir as compat_output_dir
from hf_stability.alerts import training_settings
from hf_stability.callbacks import SkipNonFiniteCallback, SpikeRollbackCallback
from hf_stability.doctor import diagnose, findings_markdown
from hf_stability.event_digest import read_event_digest
from hf_stability.events import EVENTS_FILENAME
from hf_stability.report import (
    RunRecord,
    gradient_health,
    gradient_health_lines,
    plot_training_curves,
    superseded_event_files,
)

# The templates' single copy is the top-level `model_cards/` of the source tree (editable installs and
# checkouts find it there); a wheel ships it inside the package (pyproject's `package-dir`).
_TEMPLATE_DIRS = (Path(__file__).parent / "model_cards", Path(__file__).parents[1] / "model_cards")
TEMPLATES_DIR = next((path for path in _TEMPLATE_DIRS if (path / "card.md").is_file()), _TEMPLATE_DIRS[0])
OBJECTIVES = ("bert", "bart", "t5")
CARD_FILENAME = "README.md"


@dataclasses.dataclass(frozen=True)
class _ObjectiveCard:
    pipeline_tag: str | None  # must be a task the installed `transformers.pipeline` accepts (or None)
    task_type: str  # the Hub task of the model-index entry
    rows: str
    evaluation: str


_OBJECTIVE_CARDS = {
    "bert": _ObjectiveCard(
        "fill-mask",
        "fill-mask",
        "sentence pairs built per document (sentences split at `.`, `!`, `?` and blank lines)",
        "masked-token accuracy and perplexity over the chosen (masked) positions; NSP accuracy over the pairs",
    ),
    # BART's pre-training task is mask filling; `fill-mask` loads BartForConditionalGeneration.
    "bart": _ObjectiveCard(
        "fill-mask",
        "fill-mask",
        "the documents' token stream cut into `<s> … </s>` blocks; sentences end at full stops",
        "token accuracy and perplexity over every reconstructed position",
    ),
    # transformers 5 has no pipeline for T5's sentinel filling (text2text-generation was removed): no tag.
    "t5": _ObjectiveCard(
        None,
        "text2text-generation",
        "the documents' token stream cut into raw blocks sized by `t5_span_corruption_lengths`, so that the "
        "corrupted input is exactly the model's input length",
        "token accuracy and perplexity over the target positions (sentinels and hidden spans)",
    ),
}
# Model-config entries shown in the card (whichever the model family has).
CARD_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "d_model",
    "num_hidden_layers",
    "encoder_layers",
    "decoder_layers",
    "num_layers",
    "num_decoder_layers",
    "num_attention_heads",
    "encoder_attention_heads",
    "num_heads",
    "intermediate_size",
    "encoder_ffn_dim",
    "d_ff",
    "max_position_embeddings",
)
_STABILITY_KNOBS = (
    "skip_nonfinite",
    "spike_rollback",
    "spike_metric",
    "spike_sigma",
    "spike_window",
    "snapshot_interval",
)
# Held-out metrics that go into the model-index: log key -> (metric type, readable name).
_INDEXED_METRICS = {
    "eval_masked_token_accuracy": ("accuracy", "masked token accuracy"),
    "eval_perplexity": ("perplexity", "perplexity"),
    "eval_nsp_accuracy": ("accuracy", "next sentence prediction accuracy"),
    "eval_loss": ("loss", "loss"),
}
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def template_path(objective: str) -> Path:
    """The description template of an objective (``"bert"``, ``"bart"`` or ``"t5"``)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
    return TEMPLATES_DIR / f"{objective}.md"


def training_precision(trainer: Trainer) -> tuple[str, bool]:
    """``(what ran, whether a requested mixed precision was not applied)``, from the accelerator, not the flags.

    `TrainingArguments(fp16=True)` on a CPU gives accelerate ``mixed_precision="fp16"`` without autocast
    or a grad scaler: the run is fp32 whatever the flag says.
    """
    accelerator = trainer.accelerator
    if trainer.model is None:
        raise ValueError("`trainer` has no model")
    weights = _DTYPE_NAMES.get(str(next(trainer.model.parameters()).dtype).removeprefix("torch."), "other")
    requested = accelerator.mixed_precision
    if requested == "no":
        return weights, False
    if accelerator.native_amp or accelerator.distributed_type == DistributedType.DEEPSPEED:
        scaling = ", dynamic loss scaling" if accelerator.scaler is not None else ""
        return f"{requested} mixed precision ({weights} weights{scaling})", False
    return f"{weights} ({requested} was requested but has no effect on {accelerator.device.type})", True


def build_model_card(
    trainer: Trainer,
    *,
    model_name: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    pipeline_tag: str | None = None,
    dataset_config: str | None = None,
    objective: str | None = None,
    objective_args: Any = None,
    data: str | None = None,
    tokenizer: str | None = None,
    max_seq_length: int | None = None,
    initialised_from: str | None = None,
    command: str | None = None,
    model_id: str | None = None,
) -> ModelCard:
    """The card of ``trainer``'s finished run (call on the main process; draws ``training_curves.png``).

    Args:
        objective: ``"bert"``, ``"bart"`` or ``"t5"`` for a pre-training recipe (with ``objective_args``, the
            objective's argument dataclass as parsed); ``None`` describes a generic `StabilityTrainer` run.
        base_model: the Hub id training continued from (front matter ``base_model``).
        datasets: Hub dataset ids of the training data (front matter ``datasets``; the model-index uses the first).
        pipeline_tag: overrides the objective's (``fill-mask`` for BERT and BART, none for T5).
        data, tokenizer, initialised_from, command: free text for the card's Data and Training sections.
        model_id: where the usage snippet loads the model from (default: ``args.hub_model_id`` when pushing,
            else ``output_dir``).
    """
    if objective is not None:
        template_path(objective)  # validates the name
        if objective_args is None or not dataclasses.is_dataclass(objective_args):
            raise TypeError("`objective_args` must be the objective's argument dataclass instance.")
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    output_dir = Path(compat_output_dir(args))
    model_name = model_name or output_dir.name
    model_id = model_id or (args.hub_model_id if args.push_to_hub and args.hub_model_id else str(output_dir))
    digest = read_event_digest(output_dir)
    run = RunRecord(
        output_dir,
        list(trainer.state.log_history),
        list(digest.recent),
        None,
        has_events_file=(output_dir / EVENTS_FILENAME).is_file(),
        superseded=superseded_event_files(output_dir),
        digest=digest,
    )
    final = _final_metrics(run.log_history)
    kind = _OBJECTIVE_CARDS.get(objective) if objective is not None else None
    pipeline_tag = pipeline_tag or (kind.pipeline_tag if kind else None)
    plot, plot_missing = _plot(run)
    card_data = ModelCardData(
        model_name=model_name,
        language=language,
        license=license,
        library_name="transformers",
        tags=list(dict.fromkeys(["hf-stability", *(["pretraining", objective] if objective else []), *tags])),
        base_model=base_model,
        datasets=list(datasets) or None,
        pipeline_tag=pipeline_tag,
        eval_results=_eval_results(final, kind.task_type if kind else "other", datasets, dataset_config, data) or None,
    )
    precision, _ = training_precision(trainer)
    tokenizer_for_usage = getattr(trainer, "processing_class", None)
    template = TEMPLATES_DIR / "card.md"
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        description=_description(objective, objective_args, model),
        data=data,
        tokenizer=tokenizer,
        rows=f"{kind.rows}; {max_seq_length} tokens per model input" if kind and max_seq_length else None,
        initialised_from=initialised_from,
        evaluation=(kind.evaluation if kind else "the metrics `compute_metrics` returned")
        if any(key.startswith("eval_") for key in final)
        else "none in this run",
        command=command,
        world_size=args.world_size,
        hyperparameters=_table(_hyperparameters(trainer, precision), "hyper-parameter"),
        objective_settings=_objective_table(objective_args) if objective else None,
        model_config=_table(_model_config(model), "setting"),
        metrics=_table({key: _number(value) for key, value in final.items()}, "metric"),
        stability=_stability_section(run, trainer),
        diagnosis=findings_markdown(diagnose(run, training_settings(args))),
        plot_filename=plot.name if plot is not None else None,
        plot_missing=plot_missing,
        usage=_usage(objective, model, model_id, tokenizer_for_usage, pipeline_tag),
    )


def _plot(run: RunRecord) -> tuple[Path | None, str | None]:
    """The training-curves PNG, or why the card has none: a core install has no matplotlib (the ``plot`` extra),
    and the card, so ``push_to_hub``, must not fail for a picture."""
    if not (run.log_history or run.events):
        return None, None
    try:
        return plot_training_curves(run), None
    except ImportError as error:
        return None, str(error)


def _description(objective: str | None, objective_args: Any, model: Any) -> str:
    model_class, num_parameters = type(model).__name__, f"{model.num_parameters():,}"
    if objective is None:
        return (
            f"A {model_class} ({num_parameters} parameters) trained with hf-stability's `StabilityTrainer` "
            "(non-finite step skipping, loss-spike rollback and stability telemetry on top of `Trainer`)."
        )
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    template = environment.from_string(template_path(objective).read_text(encoding="utf-8"))
    return template.render(
        s=objective_args, model_class=model_class, num_parameters=num_parameters, pct=_percent
    ).strip()


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


def _hyperparameters(trainer: Trainer, precision: str) -> dict[str, Any]:
    args, state = trainer.args, trainer.state
    world_size = args.world_size
    rows = {
        "learning_rate": args.learning_rate,
        "optimizer": f"{_plain(args.optim)} (betas=({args.adam_beta1}, {args.adam_beta2}), eps={args.adam_epsilon})",
        "weight_decay": args.weight_decay,
        "lr_scheduler": f"{_plain(args.lr_scheduler_type)} {args.lr_scheduler_kwargs or ''}".strip(),
        "warmup": _warmup(args.warmup_steps, args.get_warmup_steps(state.max_steps)),
        "max_grad_norm": args.max_grad_norm,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": world_size,
        "total_train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "training steps": f"{state.global_step} of max_steps {state.max_steps}",
        "precision": precision,
        "seed": args.seed,
    }
    rows.update(_stability_settings(trainer))
    return rows


def _stability_settings(trainer: Trainer) -> dict[str, Any]:
    """The protection settings that ran, read from the installed callbacks, not ``args``: a callback passed in
    ``callbacks`` runs with its own keywords, and runs even when ``args`` switches its default off."""
    rows: dict[str, Any] = {}
    switches = (("skip_nonfinite", SkipNonFiniteCallback), ("spike_rollback", SpikeRollbackCallback))
    for switch, callback_class in switches:
        callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, callback_class)), None)
        rows[switch] = callback is not None
        if callback is not None:
            rows.update(callback.settings.as_dict())
    return {name: rows[name] for name in _STABILITY_KNOBS if name in rows}


def _warmup(setting: float, steps: int) -> str:
    """``warmup_steps`` below 1 is a ratio of the training steps in `TrainingArguments`; say which it was."""
    if 0 < setting < 1:
        return f"{_percent(setting)} of the training steps ({steps} steps)"
    return f"{steps} steps"


def _model_config(model: Any) -> dict[str, Any]:
    config = model.config.to_dict()
    return {key: config[key] for key in CARD_CONFIG_KEYS if key in config}


def _objective_table(objective_args: Any) -> str:
    lines = ["| setting | value | default |", "|---|---|---|"]
    for spec in dataclasses.fields(objective_args):
        value = getattr(objective_args, spec.name)
        shown = f"**{value}**" if value != spec.default else f"{value}"
        lines.append(f"| {spec.name} | {shown} | {spec.default} |")
    return "\n".join(lines)


def _final_metrics(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The final summary (``train_loss``…), the last logged training loss and the last evaluation."""
    metrics: dict[str, Any] = {}
    losses = [entry for entry in log_history if "loss" in entry]
    for entry in log_history:
        if "train_loss" in entry:
            metrics["train_loss"] = entry["train_loss"]
    if losses:
        metrics[f"last logged training loss (step {losses[-1]['step']})"] = losses[-1]["loss"]
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if evaluations:
        metrics.update(
            (key, value)
            for key, value in evaluations[-1].items()
            if key.startswith("eval_") and not key.endswith(("_runtime", "_per_second"))
        )
    return metrics


def _eval_results(
    final: Mapping[str, Any],
    task_type: str,
    datasets: Sequence[str],
    dataset_config: str | None,
    data: str | None,
) -> list[EvalResult]:
    dataset_type = datasets[0] if datasets else "text"
    return [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset_type,
            dataset_name=data or dataset_type,
            dataset_config=dataset_config,
            dataset_split="held-out",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(float(final[key]), 4),
        )
        for key, (metric_type, metric_name) in _INDEXED_METRICS.items()
        if isinstance(final.get(key), (int, float))
    ]


def _stability_section(run: RunRecord, trainer: Trainer) -> str:
    figures = run.summary()
    if figures["loss_scale_min"] is not None:
        scale = f"{figures['loss_scale_min']:g} to {figures['loss_scale_max']:g}"
    elif trainer.accelerator.scaler is None:
        scale = "none (no grad scaler in this run)"
    else:
        scale = "not logged"
    lines = [
        f"- Skipped steps (non-finite gradients): **{figures['skipped_steps']}**",
        f"- Rollbacks after loss spikes: **{figures['rollbacks']}**",
        f"- Loss-scale range: {scale}",
    ]
    if figures["excluded_samples"]:
        lines.append(f"- Training samples left out (`exclude_samples`, known bad): **{figures['excluded_samples']}**")
    if figures["max_grad_norm"] is not None:
        lines.append(f"- Largest logged gradient norm: {figures['max_grad_norm']:.4g}")
    lines += _gradient_health_lines(run)
    if run.events:
        total = run.event_digest.total
        if total > len(run.events):
            lines += ["", f"The last {len(run.events)} of {total} events (all are in `{EVENTS_FILENAME}`):"]
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


def _gradient_health_lines(run: RunRecord) -> list[str]:
    """The per-layer gradient check as Markdown bullets (none when ``log_layer_grad_norms`` was off)."""
    health = gradient_health(run)
    if health is None:
        return []
    headline, *outliers = gradient_health_lines(health, code=lambda name: f"`{name}`")
    return [f"- {headline[0].upper()}{headline[1:]}", *(f"  - {line}" for line in outliers)]


def _usage(objective: str | None, model: Any, model_id: str, tokenizer: Any, pipeline_tag: str | None) -> str:
    """Python that runs as written against the saved model (tested by executing the card's block)."""
    comment = "  # this run's output_dir; once pushed, its Hub repo id"
    if pipeline_tag == "fill-mask":
        text = f"The {tokenizer.mask_token} statement is executed when the loop ends."
        return "\n".join(
            [
                "from transformers import pipeline",
                "",
                f"model_id = {json.dumps(model_id)}{comment}",
                'fill_mask = pipeline("fill-mask", model=model_id)',
                f"print(fill_mask({json.dumps(text)}, top_k=3))",
            ]
        )
    model_class = type(model).__name__
    import_name = model_class if hasattr(transformers, model_class) else "AutoModel"
    lines = [
        f"from transformers import AutoTokenizer, {import_name}",
        "",
        f"model_id = {json.dumps(model_id)}{comment}",
        f"model = {import_name}.from_pretrained(model_id)",
    ]
    if objective == "t5":
        text = "The <extra_id_0> statement is executed when the <extra_id_1> ends."
        lines += [
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            f'inputs = tokenizer({json.dumps(text)}, return_tensors="pt", truncation=True)',
            "outputs = model.generate(**inputs, max_new_tokens=20)",
            "print(tokenizer.decode(outputs[0]))  # each sentinel followed by the tokens it stands for",
        ]
    elif tokenizer is not None:
        lines.append("tokenizer = AutoTokenizer.from_pretrained(model_id)")
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


def write_model_card(trainer: Trainer, path: str | os.PathLike | None = None, **details: Any) -> Path:
    """Build the card (`build_model_card` keywords) and save it, by default as ``<output_dir>/README.md``."""
    card = build_model_card(trainer, **details)
    path = Path(path) if path is not None else Path(compat_output_dir(trainer.args)) / CARD_FILENAME
    card.save(path)
    return path
