"""The stability doctor: what a run recorded, turned into ranked findings (likely cause, evidence, remedy).

It reads only what the run left: the events (``stability_events.jsonl``, streamed), the logged history (loss,
``grad_norm``, ``learning_rate``, ``stability/loss_scale``, ``stability/fp16_underflow_fraction``, per-layer
``stability/grad_norm/*``) and, when present, ``stability_bad_samples.json`` (sample index -> the events that
named it). Each rule is one small function that returns a `Finding` or ``None``; a finding names its evidence
(steps, figures, layers, samples) and says "likely": the record shows symptoms, not the cause itself. A run
whose record shows none of the symptoms gets no finding (see docs/doctor.md for each rule's threshold and why).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import statistics
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_stability.events import BAD_SAMPLES_FILENAME, EVENTS_FILENAME
from hf_stability.report import RunRecord, gradient_health, load_run

# GradScaler starts high and halves on each overflow until the gradients fit: overflow skips from the first
# step on, one after another, are that search. Recurring ones after it mean the range is exceeded in training.
RECURRING_OVERFLOWS = 3
# A scale at or below 1 no longer lifts small gradients at all: fp16 is then running unscaled.
LOSS_SCALE_FLOOR = 1.0
# Median share of nonzero gradient elements below fp16's smallest subnormal (2^-24) after scaling. A healthy
# emulated-fp16 tiny BERT (scale 2^10) loses well under 0.1%; at 1% the lost updates are no longer noise.
UNDERFLOW_FRACTION = 0.01
# Logged gradient norms that rose step after step, and by how much in all, right before a skip or spike.
GROWTH_STEPS = 5
GROWTH_FACTOR = 4.0
# Rollbacks after warm-up, the later ones with a cut learning rate, that still spiked.
RECURRING_SPIKES = 2
# A sample named by events of this many distinct steps keeps causing trouble.
RECURRING_SAMPLE_STEPS = 2
# The events that mark trouble at a step (what growing gradients may lead up to).
TROUBLE_EVENTS = ("skip", "nonfinite_loss", "rollback", "stop")


@dataclass(frozen=True)
class Finding:
    """One diagnosis: the likely cause, the evidence for it and what to do, ranked by ``severity`` (higher first)."""

    rule: str
    cause: str
    evidence: list[str]
    remedy: list[str]
    severity: int
    steps: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)

    def headline(self) -> str:
        return f"[{self.rule}] {self.cause}"

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "cause": self.cause, "evidence": self.evidence, "remedy": self.remedy,
                "severity": self.severity, "steps": self.steps, "samples": self.samples}


@dataclass
class RunEvidence:
    """What the rules look at, gathered once: the events (their steps in compact arrays: a run can hold millions of
    skips), the logged series, the bad samples."""

    run: RunRecord
    skip_steps: array = field(default_factory=lambda: array("q"))
    overflow_skip_steps: array = field(default_factory=lambda: array("q"))  # skips with reason fp16_overflow
    skip_scales: list[float] = field(default_factory=list)  # the lowest and highest loss scale of the skips
    skip_reasons: dict[str, int] = field(default_factory=dict)
    nonfinite_loss_steps: array = field(default_factory=lambda: array("q"))
    rollbacks: list[dict[str, Any]] = field(default_factory=list)  # bounded by max_rollbacks
    stops: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_weight_steps: list[int] = field(default_factory=list)
    # sample index -> the events (dicts with at least ``step``) that named it.
    bad_samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        return self.run.series(key)

    def trouble_steps(self) -> list[int]:
        """The first step of each run of trouble (a skip, non-finite loss, rollback or stop), in order."""
        steps = sorted({*self.skip_steps, *self.nonfinite_loss_steps,
                        *(e.get("spike_step", e["step"]) for e in self.rollbacks), *(e["step"] for e in self.stops)})
        return [step for index, step in enumerate(steps) if index == 0 or steps[index - 1] != step - 1]


def _stream_events(path: Path) -> Iterator[dict[str, Any]]:
    """The valid events of ``path``, one at a time (damaged lines are the report's to warn about).

    One decoder, and the checks `event_problem` makes of the fields used here inlined: a million events stream in
    a few seconds.
    """
    if not path.is_file():
        return
    decode = json.JSONDecoder().raw_decode
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = decode(line.strip())[0]
            except ValueError:
                continue
            if (type(record) is dict and type(record.get("step")) is int and record["step"] >= 0
                    and type(record.get("event")) is str and type(record.get("reason")) is str):
                yield record


def read_bad_samples(output_dir: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """``stability_bad_samples.json`` (``{"<index>": [event, ...]}``, each event with an integer ``step``) as
    sample index -> events; an absent file means none. A file of another shape raises a one-line `ValueError`."""
    path = Path(output_dir) / BAD_SAMPLES_FILENAME
    return read_bad_samples_file(path) if path.is_file() else {}


def read_bad_samples_file(path: Path) -> dict[int, list[dict[str, Any]]]:
    """A bad-samples file at any path (`read_bad_samples`; also what ``exclude_samples`` names)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    shape = f"{path}: expected {{\"<sample index>\": [{{\"step\": <int>, ...}}, ...]}}, got {json.dumps(data)[:80]}"
    if not isinstance(data, dict):
        raise ValueError(shape)
    samples: dict[int, list[dict[str, Any]]] = {}
    for key, events in data.items():
        valid = isinstance(events, list) and all(isinstance(e, dict) and type(e.get("step")) is int for e in events)
        if not key.isdigit() or not valid:
            raise ValueError(shape)
        samples[int(key)] = events
    return samples


def gather(run: RunRecord, settings: Mapping[str, Any] | None = None) -> RunEvidence:
    """Collect the evidence of ``run`` (streams its events file; memory grows with the number of events' steps)."""
    evidence = RunEvidence(run, settings=settings or {}, bad_samples=read_bad_samples(run.output_dir))
    events = _stream_events(run.output_dir / EVENTS_FILENAME) if run.has_events_file else iter(run.events)
    for event in events:
        kind, step = event["event"], event["step"]
        if kind == "skip":
            evidence.skip_steps.append(step)
            reason = event["reason"]
            evidence.skip_reasons[reason] = evidence.skip_reasons.get(reason, 0) + 1
            if reason == "fp16_overflow":
                evidence.overflow_skip_steps.append(step)
            scale = event.get("loss_scale")
            if isinstance(scale, (int, float)):
                evidence.skip_scales = [min([scale, *evidence.skip_scales]), max([scale, *evidence.skip_scales])]
        elif kind == "nonfinite_loss":
            evidence.nonfinite_loss_steps.append(step)
        elif kind == "nonfinite_parameters":
            evidence.nonfinite_weight_steps.append(step)
        elif kind == "rollback":
            evidence.rollbacks.append(event)
            if event.get("nonfinite_weights") is True:
                evidence.nonfinite_weight_steps.append(step)
        elif kind == "stop":
            evidence.stops.append(event)
            if isinstance(event.get("nonfinite_weights_step"), int) or event.get("nonfinite_weights") is True:
                evidence.nonfinite_weight_steps.append(event.get("nonfinite_weights_step", step))
    return evidence


def _steps_text(steps: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(step) for step in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


def _samples_at(evidence: RunEvidence, steps: set[int]) -> list[int]:
    """The sample indices the bad-samples file ties to any of ``steps``."""
    return sorted(index for index, events in evidence.bad_samples.items() if any(e["step"] in steps for e in events))


def _recurring_overflow_skips(evidence: RunEvidence) -> list[int]:
    """Steps of the fp16 overflow skips after the scaler's initial search (the consecutive ones from step 1 on)."""
    search_end = 0
    for step in evidence.overflow_skip_steps:
        if step != search_end + 1:
            break
        search_end = step
    return [step for step in evidence.overflow_skip_steps if step > search_end]


def rule_stop_after_skips(evidence: RunEvidence) -> Finding | None:
    """A stop after ``max_consecutive_skips``: from its first skipped step on, no batch trained."""
    stop = next((e for e in reversed(evidence.stops) if isinstance(e.get("consecutive"), int)), None)
    if stop is None:
        return None
    first = stop["step"] - stop["consecutive"] + 1
    window = set(range(first, stop["step"] + 1))
    reasons = sorted(evidence.skip_reasons)
    samples = _samples_at(evidence, {first})
    facts = [f"training stopped at step {stop['step']} after {stop['consecutive']} consecutive skipped steps "
             f"({first}..{stop['step']}; skip reasons in this run: {', '.join(reasons) or 'none recorded'})",
             f"the first bad step is {first}; the checkpoint saved at the stop holds the weights of step {first - 1}"]
    if samples:
        facts.append(f"samples of step {first} named in {BAD_SAMPLES_FILENAME}: {_steps_text(samples)}")
    return Finding(
        "stop_after_skips",
        f"Likely the data or the model is broken from step {first} on: every step since then had non-finite "
        "gradients.",
        facts,
        [f"inspect the batches of step {first} on (" + (f"samples {_steps_text(samples)}" if samples else
         "the step's samples are not recorded in this run") + ")",
         "if the data is fine, the model broke: resume from an earlier checkpoint with a lower learning rate",
         "if the data is bad, leave those samples out and resume from the saved checkpoint"],
        100, steps=sorted(window), samples=samples,
    )


def rule_nonfinite_weights(evidence: RunEvidence) -> Finding | None:
    """Non-finite weights: an update itself overflowed, whatever the batch that followed."""
    steps = sorted(set(evidence.nonfinite_weight_steps))
    if not steps:
        return None
    return Finding(
        "nonfinite_weights",
        "Likely the optimizer update itself overflowed: the weights became non-finite (no batch is to blame for "
        "the steps after it).",
        [f"non-finite weights found at step(s) {_steps_text(steps)}"],
        ["lower the learning rate", "raise Adam's epsilon (e.g. 1e-6 instead of 1e-8) so tiny second moments "
         "cannot blow an update up", "with fp16, keep fp32 master weights (mixed precision, not a model cast "
         "to .half()): fp16 weights cannot hold small updates and overflow at 65504"],
        90, steps=steps,
    )


def rule_fp16_range(evidence: RunEvidence) -> Finding | None:
    """fp16 overflows that keep coming after the scaler's search, or a scale down at its floor."""
    recurring = _recurring_overflow_skips(evidence)
    scales = [value for _, value in evidence.series("stability/loss_scale")]
    scales += evidence.skip_scales
    # A scale set low from the start is the underflow rule's business; here overflows must have pushed it down.
    floored = bool(evidence.overflow_skip_steps) and min(scales, default=math.inf) <= LOSS_SCALE_FLOOR
    if len(recurring) < RECURRING_OVERFLOWS and not floored:
        return None
    facts = []
    if recurring:
        facts.append(f"{len(recurring)} fp16 overflow skip(s) after the loss scaler's initial search, at steps "
                     f"{_steps_text(recurring)}; each halved the loss scale")
    if scales:
        facts.append(f"loss scale ranged {min(scales):g} .. {max(scales):g}"
                     + (f" (at or below the floor {LOSS_SCALE_FLOOR:g} after overflows: fp16 runs unscaled)"
                        if floored else ""))
    return Finding(
        "fp16_range",
        "Likely the fp16 range is exceeded: gradients keep overflowing 65504 however far the loss scale falls.",
        facts,
        ["use bf16 (`--bf16`) where the hardware has it: same range as fp32, no loss scaling needed",
         "else lower the learning rate and lengthen the warm-up", "check the initialisation scale (a too-large "
         "init std makes large activations and gradients)"],
        80, steps=recurring,
    )


def rule_recurring_samples(evidence: RunEvidence) -> Finding | None:
    """The same samples named by events at several steps: the data, not the optimisation."""
    recurring = {index: sorted({e["step"] for e in events}) for index, events in evidence.bad_samples.items()}
    # A spike replayed from the restored state that came back (``spike_replay``) is the data at one step already.
    replayed = {index for index, events in evidence.bad_samples.items() if any(e.get("reproduced") for e in events)}
    recurring = {index: steps for index, steps in recurring.items()
                 if len(steps) >= RECURRING_SAMPLE_STEPS or index in replayed}
    if not recurring:
        return None
    indices = sorted(recurring)
    facts = [f"sample {index}: events at steps {_steps_text(recurring[index])} "
             f"({', '.join(sorted({e.get('event', '?') for e in evidence.bad_samples[index]}))})"
             + ("; the spike came back when its step was replayed from the restored state" if index in replayed
                else "")
             for index in indices[:10]]
    if len(indices) > 10:
        facts.append(f"... and {len(indices) - 10} more sample(s), all in {BAD_SAMPLES_FILENAME}")
    return Finding(
        "recurring_samples",
        f"Likely bad data: {len(indices)} sample(s) were in the batches of trouble at {RECURRING_SAMPLE_STEPS} or "
        "more different steps" + (" or spiked again when their step was replayed" if replayed & recurring.keys()
                                  else "") + ".",
        facts,
        [f"leave them out (StabilityConfig.exclude_samples): resume in this output directory with "
         f"`--exclude_samples auto --resume_from_checkpoint latest`, or rerun with "
         f"`--exclude_samples {evidence.run.output_dir / BAD_SAMPLES_FILENAME}`",
         f"inspect them: `hf-stability report {evidence.run.output_dir} --bad-samples`"],
        70, steps=sorted({step for steps in recurring.values() for step in steps}), samples=indices,
    )


def _warmup_end(evidence: RunEvidence) -> int | None:
    """The first logged step at the peak learning rate (the end of warm-up), or ``None`` when no LR was logged."""
    rates = evidence.series("learning_rate")
    if not rates:
        return None
    peak = max(value for _, value in rates)
    return next(step for step, value in rates if value >= peak * (1 - 1e-6))


def rule_recurring_spikes(evidence: RunEvidence) -> Finding | None:
    """Loss spikes after warm-up that keep coming back after rollbacks, even with the learning rate cut."""
    spikes = [e for e in evidence.rollbacks if e.get("nonfinite_weights") is not True]
    spikes += [e for e in evidence.stops if "spike_step" in e and e.get("nonfinite_weights") is not True]
    warmup = _warmup_end(evidence)
    after = [e for e in spikes if warmup is None or e.get("spike_step", e["step"]) > warmup]
    if len(after) < RECURRING_SPIKES:
        return None
    steps = [e.get("spike_step", e["step"]) for e in after]
    # A rollback's `lr_scale` is the scale it left; the spikes after a cut one came at the lower learning rate.
    cuts = [e["lr_scale"] for e in after[:-1] if isinstance(e.get("lr_scale"), (int, float)) and e["lr_scale"] < 1]
    peak = f"peak learning rate reached at step {warmup}" if warmup is not None else "no learning rate logged"
    facts = [f"{len(after)} spike(s) after warm-up ({peak}) at steps {_steps_text(steps)}"]
    if cuts:
        facts.append(f"they recurred after rollbacks that had cut the learning rate to {min(cuts):g}x")
    remedy = ["lower the peak learning rate", "Adam beta2 = 0.95 (instead of 0.999): the second moment then "
              "follows a sudden gradient growth within ~20 steps instead of ~1000, the usual cause of late spikes "
              "in large-model pre-training", "a larger Adam epsilon (1e-6)", "a longer warm-up"]
    first_logged = evidence.series("learning_rate")[0][0] if warmup is not None else None
    if warmup is not None and warmup == first_logged:
        remedy[3] = "a warm-up: this run's learning rate was at its peak from the first logged step"
    beta2 = evidence.settings.get("adam_beta2")
    if isinstance(beta2, float) and beta2 <= 0.95:
        remedy[1] = f"Adam beta2 is already {beta2:g}: leave it"
    remedy.append("QK-norm or z-loss if the attention logits grow (this record cannot show it: watch the query/key "
                  "layers with `log_layer_grad_norms`)")
    return Finding(
        "recurring_spikes",
        "Likely an optimisation instability: loss spikes keep coming after warm-up"
        + (", also after rollbacks cut the learning rate." if cuts else ", also after rollbacks."),
        facts, remedy, 60, steps=steps,
    )


def rule_growing_gradients(evidence: RunEvidence) -> Finding | None:
    """The logged gradient norm rising step after step right before trouble: exploding gradients."""
    norms = evidence.series("grad_norm")
    if len(norms) <= GROWTH_STEPS:
        return None
    steps = [step for step, _ in norms]
    hits = []
    for trouble in evidence.trouble_steps():
        end = bisect.bisect_left(steps, trouble) - 1  # the last logged norm before the trouble
        rises = 0
        while end - rises > 0 and norms[end - rises][1] > norms[end - rises - 1][1]:
            rises += 1
        if rises >= GROWTH_STEPS and norms[end][1] >= GROWTH_FACTOR * norms[end - rises][1]:
            (start, low), (last, high) = norms[end - rises], norms[end]
            hits.append((trouble, start, last, low, high, rises))
    if not hits:
        return None
    facts = [f"grad norm rose {rises} logged steps in a row, {low:.3g} (step {start}) -> {high:.3g} (step {last}), "
             f"before the trouble at step {trouble}" for trouble, start, last, low, high, rises in hits]
    clip = evidence.settings.get("max_grad_norm")
    clipping = ("clip the gradient norm (`max_grad_norm` is off in this run)" if clip in (0, 0.0, None) and
                "max_grad_norm" in evidence.settings else "clip the gradient norm (`max_grad_norm`, e.g. 1.0)")
    return Finding(
        "growing_gradients",
        "Likely exploding gradients: the gradient norm grew for many steps before the spike or skip.",
        facts,
        [clipping, "adaptive clipping (`--adaptive_clip`, ZClip) bounds a norm far above its recent mean",
         "lower the learning rate"],
        50, steps=[hit[0] for hit in hits],
    )


def rule_fp16_underflow(evidence: RunEvidence) -> Finding | None:
    """Many scaled gradient elements below fp16's smallest subnormal in a run with a loss scaler (fp16)."""
    if not evidence.series("stability/loss_scale"):
        return None  # without a scaler the run is not fp16: the logged fraction only tells how fp16 would fare
    fractions = evidence.series("stability/fp16_underflow_fraction")
    if not fractions:
        return None
    median = statistics.median(value for _, value in fractions)
    if median < UNDERFLOW_FRACTION:
        return None
    worst_step, worst = max(fractions, key=lambda point: point[1])
    scales = [value for _, value in evidence.series("stability/loss_scale")]
    return Finding(
        "fp16_underflow",
        "Likely fp16 underflow: a large share of the gradients is below 2^-24 after loss scaling and is lost as 0.",
        [f"median underflow fraction {median:.1%} over {len(fractions)} logged steps (worst {worst:.1%} at step "
         f"{worst_step}); threshold {UNDERFLOW_FRACTION:.0%}", f"loss scale {min(scales):g} .. {max(scales):g}"],
        ["raise the initial loss scale (GradScaler init_scale, e.g. 65536) and its minimum (DeepSpeed "
         "`min_loss_scale`)", "or use bf16, whose range reaches down to 1e-38"],
        40, steps=[worst_step],
    )


def rule_layer_outliers(evidence: RunEvidence) -> Finding | None:
    """A layer whose gradient norm stays orders of magnitude off the median layer's (see `gradient_health`)."""
    health = gradient_health(evidence.run)
    if health is None or not health.outliers:
        return None
    facts = [f"{o.layer} ({o.kind}): median norm {o.median_norm:.3g}, {o.ratio:.2g}x the median layer "
             f"({health.median_norm:.3g})" for o in health.outliers]
    return Finding(
        "layer_gradients",
        f"Likely vanishing/exploding gradients in {len(health.outliers)} layer(s): their gradient norm stays "
        f"beyond {health.vanishing_ratio:g}x .. {health.exploding_ratio:g}x the median layer over {health.steps} "
        "logged steps.",
        facts,
        ["check those layers' initialisation (std, scaled init of residual projections)",
         "residual and LayerNorm placement (pre-LN keeps gradients in range through depth)",
         "the activation (a saturating one vanishes; an unbounded one can explode)"],
        30,
    )


RULES: tuple[Callable[[RunEvidence], Finding | None], ...] = (
    rule_stop_after_skips,
    rule_nonfinite_weights,
    rule_fp16_range,
    rule_recurring_samples,
    rule_recurring_spikes,
    rule_growing_gradients,
    rule_fp16_underflow,
    rule_layer_outliers,
)


def diagnose(run: RunRecord | str | os.PathLike, settings: Mapping[str, Any] | None = None) -> list[Finding]:
    """The findings of a run (a loaded `RunRecord` or an output directory), most severe first.

    ``settings``: training arguments when known (``adam_beta2``, ``max_grad_norm``, ...), which let a remedy
    say what the run already does; an output directory alone does not record them.
    """
    record = run if isinstance(run, RunRecord) else load_run(run)
    evidence = gather(record, settings)
    findings = [finding for rule in RULES if (finding := rule(evidence)) is not None]
    return sorted(findings, key=lambda finding: -finding.severity)


def format_findings(findings: list[Finding], indent: str = "") -> list[str]:
    """Text lines: a numbered finding each with its evidence and remedy, or the plain statement of none."""
    if not findings:
        return [f"{indent}No findings: the record shows no symptom of instability."]
    lines = []
    for number, finding in enumerate(findings, start=1):
        lines.append(f"{indent}{number}. {finding.headline()}")
        lines += [f"{indent}   evidence: {fact}" for fact in finding.evidence]
        lines += [f"{indent}   remedy: {step}" for step in finding.remedy]
    return lines


def findings_markdown(findings: list[Finding]) -> str:
    """The findings as Markdown (the model card's Diagnosis)."""
    if not findings:
        return "No findings: the record shows no symptom of instability."
    lines = []
    for number, finding in enumerate(findings, start=1):
        lines.append(f"{number}. **{finding.cause}** (`{finding.rule}`)")
        lines += [f"   - Evidence: {fact}" for fact in finding.evidence]
        lines += [f"   - Remedy: {step}" for step in finding.remedy]
    return "\n".join(lines)

