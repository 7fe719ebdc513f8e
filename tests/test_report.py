"""`hf_stability.report`: read a run back from its output directory, summarise it, plot it."""

from __future__ import annotations

import pytest
from matplotlib.image import imread
from plain_trainer_run import POISONED_STEP, STEPS, train_plain_run

from hf_stability.events import StabilityEventLog
from hf_stability.report import format_summary, load_run, plot_training_curves


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
