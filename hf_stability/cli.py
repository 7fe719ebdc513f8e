"""The ``hf-stability`` command.

``hf-stability report OUTPUT_DIR`` prints a run's loss and stability events (from ``trainer_state.json``
and ``stability_events.jsonl``) and draws ``OUTPUT_DIR/training_curves.png`` (with ``--bad-samples``, lists the
samples the events named instead: `hf_stability.sample_report`); ``hf-stability doctor OUTPUT_DIR``
prints the run's ranked findings (`hf_stability.doctor`), or says there are none.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from hf_stability import __version__

if TYPE_CHECKING:
    from hf_stability.report import RunRecord


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-stability", description="Tools for hf-stability training runs.")
    parser.add_argument("--version", action="version", version=f"hf-stability {__version__}")
    commands = parser.add_subparsers(dest="command")
    report = commands.add_parser(
        "report",
        help="Summarise a run's stability events and plot its training curves.",
        description="Summarise a run's loss, skipped steps, rollbacks, loss scale and, when per-layer gradient norms "
        "were logged (log_layer_grad_norms), the layers whose gradients vanish or explode; plot its training curves. "
        "Works for any output directory of StabilityTrainer, the recipes, or a plain Trainer with the callbacks.",
    )
    report.add_argument("output_dir", help="The run's output directory (holding trainer_state.json or checkpoints).")
    report.add_argument(
        "--plot", default=None, help="Where to write the PNG (default: OUTPUT_DIR/training_curves.png)."
    )
    report.add_argument("--no-plot", action="store_true", help="Only print the summary.")
    report.add_argument(
        "--bad-samples", action="store_true",
        help="Instead of the summary, list the samples the stability events named (stability_bad_samples.json) by "
        "index, with the step, rank, event and loss, and their text when the run recorded its data (the recipes do).",
    )
    report.add_argument("--json", action="store_true", help="With --bad-samples: print the listing as JSON.")
    doctor = commands.add_parser(
        "doctor",
        help="Diagnose a run: likely causes of its skips, spikes and stops, with evidence and remedies.",
        description="Turn what a run recorded (stability events, logged loss, gradient norms, loss scale, fp16 "
        "underflow, per-layer gradient norms, bad samples) into ranked findings: the likely cause, the evidence and "
        "the remedy. Exits 0 whether or not there are findings.",
    )
    doctor.add_argument("output_dir", help="The run's output directory (holding trainer_state.json or checkpoints).")
    doctor.add_argument("--json", action="store_true", help="Print the findings as a JSON list.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from hf_stability.doctor import diagnose, format_findings  # the report ends with its diagnosis
    from hf_stability.report import format_summary, load_run, plot_training_curves

    if args.command == "report" and args.json and not args.bad_samples:
        parser.error("report: --json needs --bad-samples")
    try:
        if args.command == "report" and args.bad_samples:  # needs only the bad-samples file, not a trainer state
            return _bad_samples(args.output_dir, args.json)
        run = load_run(args.output_dir)
        if args.command == "doctor":
            return _doctor(run, args.json)
    except ValueError as error:
        print(f"hf-stability {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(run))
    print("\n".join(["  Diagnosis (hf-stability doctor):", *format_findings(diagnose(run), indent="    ")]))
    if not args.no_plot:
        try:
            print(f"  plot: {plot_training_curves(run, args.plot)}")
        except ImportError as error:  # matplotlib is the `plot` extra
            print(f"hf-stability report: error: {error}", file=sys.stderr)
            return 2
    return 0


def _bad_samples(output_dir: str, as_json: bool) -> int:
    from hf_stability.events import _json_safe
    from hf_stability.sample_report import bad_samples_listing, format_bad_samples

    listing = bad_samples_listing(output_dir)
    # Valid JSON for every reader: a NaN or infinite loss is written as a string, as in the events file.
    print(json.dumps(_json_safe(listing), indent=2, allow_nan=False) if as_json else format_bad_samples(listing))
    return 0


def _doctor(run: RunRecord, as_json: bool) -> int:
    from hf_stability.doctor import diagnose, format_findings

    findings = diagnose(run)
    if as_json:
        print(json.dumps([finding.as_dict() for finding in findings], indent=2))
    else:
        print(f"Diagnosis of {run.output_dir}:")
        print("\n".join(format_findings(findings, indent="  ")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
