"""Recipes resume from `--resume_from_checkpoint latest` offline, and refuse a bad checkpoint in one line, early.

The checkpoints are real (a BERT recipe run in a subprocess); "incomplete" is what a kill mid-write leaves:
a ``trainer_state.json`` cut off, or none at all.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest

from hf_stability import read_events
from hf_stability.pretrain.run import checkpoint_problem, main, resolve_checkpoint
from tests.integration.recipes.recipe_utils import TINY_RUN, load_recipe, run_recipe

SAVING = ["--save_steps", "2", "--save_total_limit", "5"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("bert") / "run"
    run_recipe([sys.executable], "bert", output_dir, *TINY_RUN, *SAVING, "--max_steps", "4")
    return output_dir


def bert_main(output_dir, *args: str):
    return main(load_recipe("bert").BERT, ["--output_dir", str(output_dir), *TINY_RUN, *SAVING, *args])


@pytest.mark.slow
def test_latest_skips_an_incomplete_checkpoint_and_resumes_offline(finished_run, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(finished_run, output_dir)
    state = output_dir / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:100])  # killed while writing it
    assert "not valid JSON" in checkpoint_problem(str(state.parent))
    assert resolve_checkpoint("latest", str(output_dir)) == str(output_dir / "checkpoint-2")
    assert resolve_checkpoint("True", str(output_dir)) == str(output_dir / "checkpoint-2")
    assert resolve_checkpoint("false", str(output_dir)) is None
    result = run_recipe(
        [sys.executable],
        "bert",
        output_dir,
        *TINY_RUN,
        *SAVING,
        "--max_steps",
        "6",
        "--resume_from_checkpoint",
        "latest",
    )
    assert "Passing over incomplete checkpoint" in result.stdout + result.stderr
    final = json.loads((output_dir / "trainer_state.json").read_text())
    assert final["global_step"] == 6
    assert [entry["step"] for entry in final["log_history"] if "loss" in entry] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "no such directory"),
        ("no_state", "trainer_state.json is missing"),
        ("torn_state", "trainer_state.json is not valid JSON"),
        ("no_weights", "no model weights"),
        ("empty_tokenizer_config", "tokenizer_config.json is not valid JSON"),
        ("list_config", "config.json is not a JSON object"),
    ],
)
def test_a_bad_checkpoint_path_is_one_line_naming_it_before_anything_loads(
    finished_run, tmp_path, capsys, damage, expected
):
    output_dir = tmp_path / "run"
    checkpoint = tmp_path / "checkpoint-2"
    if damage != "missing":
        shutil.copytree(finished_run / "checkpoint-2", checkpoint)
    if damage == "no_state":
        (checkpoint / "trainer_state.json").unlink()
    elif damage == "torn_state":
        (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_hi')
    elif damage == "no_weights":
        (checkpoint / "model.safetensors").unlink()
    elif damage == "empty_tokenizer_config":  # an explicit path, not only `latest`, is checked before it loads
        (checkpoint / "tokenizer_config.json").write_text("")
    elif damage == "list_config":
        (checkpoint / "config.json").write_text("[]")
    with pytest.raises(SystemExit) as raised:  # the recipe's one-line error, exit status 2
        bert_main(output_dir, "--resume_from_checkpoint", str(checkpoint))
    message = capsys.readouterr().err.strip()
    assert raised.value.code == 2
    assert str(checkpoint) in message and expected in message and "\n" not in message
    assert not output_dir.exists()  # refused before the tokenizer, data or model were touched


def test_latest_without_a_complete_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(SystemExit) as raised:
        bert_main(tmp_path, "--resume_from_checkpoint", "latest")
    assert raised.value.code == 2
    assert re.search(r"no complete checkpoint-\* in .*incomplete: checkpoint-3", capsys.readouterr().err)


def test_a_second_run_into_the_same_output_dir_is_a_new_run_with_its_own_record(finished_run, tmp_path):
    """`make train` twice: the second run's card, report and events describe it alone; the first's are kept aside."""
    output_dir = tmp_path / "run"
    shutil.copytree(finished_run, output_dir)
    (output_dir / "stability_events.jsonl").write_text(
        json.dumps({"step": 3, "event": "rollback", "reason": "loss spike", "restored_step": 1}) + "\n"
    )
    result = run_recipe([sys.executable], "bert", output_dir, *TINY_RUN, "--max_steps", "2")
    assert "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4)" in result.stdout + result.stderr
    assert read_events(output_dir) == []
    (aside,) = output_dir.glob("stability_events.superseded-*.jsonl")
    assert [event["event"] for event in read_events(aside)] == ["rollback"]
    card = (output_dir / "README.md").read_text()
    assert "Rollbacks after loss spikes: **0**" in card and "| 3 | rollback |" not in card
    assert aside.name in card


def test_resuming_a_checkpoint_that_reached_max_steps_trains_no_further(finished_run, tmp_path):
    """Trainer alone would run one step past max_steps (a kill right after the last checkpoint, then `latest`)."""
    output_dir = tmp_path / "run"
    shutil.copytree(finished_run, output_dir)
    (output_dir / "trainer_state.json").unlink()  # killed before the final outputs were written
    result = run_recipe(
        [sys.executable], "bert", output_dir, *TINY_RUN, *SAVING, "--max_steps", "4", "--resume_from_checkpoint",
        "latest",
    )
    assert "already reached max_steps=4: nothing left to train" in result.stdout + result.stderr
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    assert (output_dir / "README.md").is_file()
