"""`hf_stability.report`: read a run back from its output directory, summarise it, plot it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from matplotlib.image import imread

from hf_stability import StabilityTrainer
from hf_stability.cli import main as cli_main
from hf_stability.events import StabilityEventLog
from hf_stability.report import format_summary, load_run, plot_training_curves
from tests.integration.plain_trainer_run import POISONED_STEP, STEPS, train_plain_run
from tests.testing_utils import PoisonGradient, mlm_dataset, subprocess_env, tiny_bert, training_args


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, bert_tokenizer):
    return train_plain_run(tmp_path_factory.mktemp("plain") / "run", bert_tokenizer)


def test_plain_trainer_run_is_read_from_its_last_checkpoint(plain_run):
    assert not (plain_run / "trainer_state.json").exists()
    run = load_run(plain_run)
    assert run.state_path == plain_run / f"checkpoint-{STEPS}" / "trainer_state.json"
    figures = run.summary()
    assert figures["steps"] == STEPS
    assert len(run.series("loss")) == STEPS  # the poison hits the gradient, not the loss
    # The skipped step's grad norm is logged as Inf; series keep finite values only.
    assert [step for step, _ in run.series("grad_norm")] == [s for s in range(1, STEPS + 1) if s != POISONED_STEP + 1]
    (skip,) = run.events
    assert skip["event"] == "skip" and skip["step"] == POISONED_STEP + 1
    assert figures["skipped_steps"] == 1 and figures["rollbacks"] == 0


def test_summary_text_lists_the_events(plain_run):
    text = format_summary(load_run(plain_run))
    assert f"last step: {STEPS} ({STEPS} training loss entries logged)" in text
    assert "skipped steps: 1" in text
    assert f"step {POISONED_STEP + 1}: skip" in text


def test_plot_is_a_png_with_the_loss_and_markers(plain_run, tmp_path):
    path = plot_training_curves(load_run(plain_run), tmp_path / "curves.png")
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_rollback_events_show_with_their_restored_step(tmp_path):
    # The rollback mechanism is tested with the callbacks; here only the report's reading of its event.
    log = StabilityEventLog(tmp_path)
    log.append(120, "rollback", "loss spike", restored_step=100, value=9.5)
    run = load_run(tmp_path)
    assert run.summary()["rollbacks"] == 1 and run.log_history == []
    assert "step 120: rollback (loss spike) -> restored step 100" in format_summary(run)
    assert plot_training_curves(run).name == "training_curves.png"


def test_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="trainer_state.json"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_run(tmp_path / "missing")


def test_counts_come_from_the_final_state_of_a_run_that_stopped_between_logging_steps(tmp_path, bert_tokenizer):
    """Three Inf steps in a row (5-7) stop the run; the last log (step 5) has seen one skip only.

    The fused default optimizer skips steps 6 and 7 on device; their queued flags are read when the queue holds
    `max_consecutive_skips` rows, at step 8, so the stop and its checkpoint come at step 8.
    """
    args = training_args(tmp_path, max_steps=20, logging_steps=5, max_consecutive_skips=3, save_strategy="steps",
                         save_steps=100)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64),
                               callbacks=[PoisonGradient([4, 5, 6])])
    trainer.train()
    run = load_run(tmp_path)
    assert run.state_path == tmp_path / "checkpoint-8" / "trainer_state.json"
    assert run.series("stability/skipped_steps")[-1] == (5, 1)
    figures = run.summary()
    assert figures["steps"] == 8 and figures["skipped_steps"] == 3
    assert "max_consecutive_skips=3" in figures["stopped"]


def test_without_an_events_file_counts_come_from_the_stored_callback_counters(tmp_path):
    state = {
        "global_step": 9,
        "log_history": [{"step": 5, "loss": 1.0, "stability/skipped_steps": 1, "stability/rollbacks": 0}],
        "stateful_callbacks": {
            "SkipNonFiniteCallback": {"args": {}, "attributes": {"skipped_steps": 4}},
            "SpikeRollbackCallback": {"args": {}, "attributes": {"rollbacks": 2}},
        },
    }
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    figures = load_run(tmp_path).summary()
    assert (figures["steps"], figures["skipped_steps"], figures["rollbacks"]) == (9, 4, 2)


def test_summary_names_the_events_moved_aside(tmp_path):
    log = StabilityEventLog(tmp_path)
    log.append(7, "skip", "nonfinite_gradients")
    with pytest.warns(UserWarning, match="a new run starts"):
        aside = log.start_run(0)
    log.append(2, "skip", "nonfinite_gradients")
    run = load_run(tmp_path)
    assert run.summary()["skipped_steps"] == 1 and run.summary()["superseded"] == [aside.name]
    assert f"earlier events moved aside (not counted here): {aside.name}" in format_summary(run)


def test_a_wrong_typed_event_line_is_skipped_with_a_warning_not_an_abort(tmp_path, capsys):
    """Valid JSON with a wrong type (a string or list step, a string restored step) once aborted in matplotlib."""
    log = StabilityEventLog(tmp_path)
    log.append(3, "skip", "nonfinite_gradients")
    with (tmp_path / "stability_events.jsonl").open("a") as handle:
        handle.write('{"step": "x", "event": "skip", "reason": "nonfinite_gradients"}\n')
        handle.write('{"step": [4], "event": "skip", "reason": "nonfinite_gradients"}\n')
        handle.write('{"step": 9, "event": "rollback", "reason": "loss spike", "restored_step": "five"}\n')
        handle.write('{"step": 9, "event": ["rollback"], "reason": "loss spike"}\n')
    log.append(12, "rollback", "loss spike", restored_step=10)
    with pytest.warns(UserWarning) as caught:
        assert cli_main(["report", str(tmp_path), "--plot", str(tmp_path / "curves.png")]) == 0
    messages = [str(warning.message) for warning in caught]
    assert any("line 2 (`step` is 'x', not a non-negative integer)" in message for message in messages)
    assert any("line 3 (`step` is [4]" in message for message in messages)
    assert any("line 4 (`restored_step` is 'five'" in message for message in messages)
    assert any("line 5 (`event` is ['rollback'], not a string)" in message for message in messages)
    text = capsys.readouterr().out
    assert "events: 2, steps 3 .. 12; 4 damaged line(s) skipped" in text
    assert "step 12: rollback (loss spike) -> restored step 10" in text
    assert imread(tmp_path / "curves.png").shape[1] > 600


MILLION = 1_000_000


def write_million_event_run(output_dir) -> None:
    """A run of 1,000,000 steps that skipped 999,000 of them, rolled back 999 times and stopped (written fast,
    in the events file's own format), with a logged loss every 1,000 steps."""
    output_dir.mkdir()
    with (output_dir / "stability_events.jsonl").open("w") as handle:
        for block in range(0, MILLION, 1000):
            lines = [
                f'{{"step": {step}, "event": "skip", "reason": "nonfinite_gradients", "time": 1.0}}\n'
                for step in range(block + 1, block + 1000)
            ]
            last = block + 1000
            if last < MILLION:
                lines.append(f'{{"step": {last}, "event": "rollback", "reason": "loss 9.5 above threshold 7.5 at step '
                             f'{last}", "restored_step": {last - 100}, "value": 9.5, "threshold": 7.5}}\n')
            else:
                lines.append(f'{{"step": {last}, "event": "stop", "reason": "max_consecutive_skips=50 reached"}}\n')
            handle.write("".join(lines))
    history = [{"step": step, "loss": 7.0 - step / MILLION} for step in range(1000, MILLION + 1, 1000)]
    (output_dir / "trainer_state.json").write_text(json.dumps({"global_step": MILLION, "log_history": history}))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from Linux's /proc")
def test_a_million_event_run_reports_a_bounded_summary_and_an_aggregated_plot(tmp_path):
    """1,000,000 events once meant a million printed lines and a million axvlines (did not finish in 13 min,
    1.9 GB). The report runs as the command does, in its own process, which reports its peak memory: the kernel's
    ``VmHWM`` of the process image, not ``ru_maxrss``, which keeps the forking pytest process's peak across exec."""
    output_dir = tmp_path / "run"
    write_million_event_run(output_dir)
    plot = tmp_path / "curves.png"
    script = (
        "import re, sys; from hf_stability.cli import main; code = main(sys.argv[1:]); "
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
        "print('peak_rss_kb', peak, file=sys.stderr); sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", script, "report", str(output_dir), "--plot", str(plot)],
                            capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert len(text.splitlines()) < 40 and len(text) < 4000, text
    assert f"events: {MILLION}, steps 1 .. {MILLION}" in text
    # Each rollback's reason names its own values: they are counted as one group.
    assert "skip (nonfinite_gradients): 999000" in text and "rollback (loss # above threshold # at step #): 999" in text
    assert "stop (max_consecutive_skips=# reached): 1" in text
    assert f"last 10 event(s) of {MILLION} (all are in stability_events.jsonl):" in text
    assert f"step {MILLION}: stop (max_consecutive_skips=50 reached)" in text
    assert "skipped steps: 999000" in text and "rollbacks: 999" in text
    peak_mb = int(result.stderr.split("peak_rss_kb")[1].split()[0]) / 1024
    assert peak_mb < 300, peak_mb  # ~90 MB: the events are counted, not kept (as dicts they would be ~1 GB)
    image = imread(plot)
    assert image.shape[0] > 300 and image.shape[1] > 600
