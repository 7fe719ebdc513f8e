"""Recipe argument parsing: recipe defaults < --config YAML < command line; unknown keys are errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from hf_stability.pretrain import InputError, main, parse_recipe_args
from tests.integration.recipes.recipe_utils import RECIPES, TINY_RUN, load_recipe


@pytest.fixture(scope="module")
def bart():
    return load_recipe("bart").BART


def write_yaml(tmp_path, values) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_recipe_defaults_follow_the_seeds_hygiene(bart):
    data, model, objective, training = parse_recipe_args(bart, [])
    assert training.output_dir == "outputs/bart-pretrain"
    assert (training.adam_beta1, training.adam_beta2, training.adam_epsilon) == (0.9, 0.95, 1e-8)
    assert training.weight_decay == 0.1 and training.max_grad_norm == 1.0
    assert training.lr_scheduler_type == "cosine_with_min_lr"
    assert training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert 0 < training.warmup_steps < 1  # a warmup ratio
    assert not training.bf16 and not training.fp16
    assert objective.mask_ratio == 0.3 and objective.poisson_lambda == 3.5
    assert data.train_file is None and model.model_name_or_path is None


def test_yaml_overrides_recipe_defaults_and_command_line_overrides_yaml(bart, tmp_path):
    config = write_yaml(
        tmp_path,
        {
            "learning_rate": 5e-4,
            "max_steps": 7,
            "mask_ratio": 0.2,
            "max_seq_length": 64,
            "adam_beta2": 0.98,
            "lr_scheduler_kwargs": {"min_lr_rate": 0.05},
        },
    )
    data, _, objective, training = parse_recipe_args(bart, ["--config", config, "--max_steps", "9", "--bf16"])
    assert training.learning_rate == 5e-4  # YAML over the recipe's 1e-3
    assert training.adam_beta2 == 0.98
    assert training.lr_scheduler_kwargs == {"min_lr_rate": 0.05}
    assert training.max_steps == 9  # command line over YAML
    assert training.bf16  # precision selectable by flag
    assert training.weight_decay == 0.1  # untouched recipe default
    assert objective.mask_ratio == 0.2 and data.max_seq_length == 64


def test_unknown_yaml_key_is_an_error_naming_it(bart, tmp_path):
    config = write_yaml(tmp_path, {"learning_rate": 1e-4, "mask_ratoi": 0.2})
    with pytest.raises(ValueError, match="mask_ratoi"):
        parse_recipe_args(bart, ["--config", config])


def test_unknown_command_line_flag_is_an_error(bart):
    with pytest.raises(ValueError, match="--bogus_flag"):
        parse_recipe_args(bart, ["--bogus_flag", "1"])


def test_config_file_must_exist_and_hold_a_mapping(bart, tmp_path):
    with pytest.raises(ValueError, match="--config"):
        parse_recipe_args(bart, ["--config", str(tmp_path / "missing.yaml")])
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_recipe_args(bart, ["--config", str(listing)])


def test_stability_config_validation_applies_to_yaml_values(bart, tmp_path):
    config = write_yaml(tmp_path, {"spike_sigma": -1.0})
    with pytest.raises(ValueError, match="spike_sigma"):
        parse_recipe_args(bart, ["--config", config])


def test_each_recipe_has_its_own_objective_flags():
    _, _, bert_args, bert_training = parse_recipe_args(load_recipe("bert").BERT, ["--whole_word_mask"])
    assert bert_args.whole_word_mask and bert_args.nsp_probability == 0.5
    assert bert_training.output_dir == "outputs/bert-pretrain"
    _, _, t5_args, _ = parse_recipe_args(load_recipe("t5").T5, ["--noise_density", "0.3"])
    assert t5_args.noise_density == 0.3 and t5_args.mean_noise_span_length == 3.0
    with pytest.raises(ValueError, match="--mask_ratio"):
        parse_recipe_args(load_recipe("t5").T5, ["--mask_ratio", "0.3"])


def test_data_and_model_arguments_reject_contradictions(bart):
    with pytest.raises(ValueError, match="dataset_name"):
        parse_recipe_args(bart, ["--dataset_name", "wikitext", "--train_file", "a.txt"])
    with pytest.raises(ValueError, match="model_config_name"):
        parse_recipe_args(bart, ["--model_name_or_path", "a", "--model_config_name", "b"])
    with pytest.raises(ValueError, match="validation_split_percentage"):
        parse_recipe_args(bart, ["--validation_split_percentage", "100"])


def test_flags_are_never_abbreviated(bart):
    # argparse's default would take --max_step as --max_steps, although the same key in YAML is an error.
    with pytest.raises(InputError, match="--max_step"):
        parse_recipe_args(bart, ["--max_step", "5"])


def test_argparse_errors_are_one_line_input_errors(bart):
    with pytest.raises(InputError, match="max_steps.*invalid int value"):
        parse_recipe_args(bart, ["--max_steps", "many"])


@pytest.mark.parametrize("max_steps", ["0", "-2"])
def test_max_steps_that_cannot_train_are_errors(bart, tmp_path, max_steps):
    with pytest.raises(InputError, match="max_steps"):
        parse_recipe_args(bart, ["--max_steps", max_steps])
    with pytest.raises(InputError, match="max_steps"):
        parse_recipe_args(bart, ["--config", write_yaml(tmp_path, {"max_steps": int(max_steps)})])


def test_max_steps_minus_one_still_means_train_for_num_train_epochs(bart):
    *_, training = parse_recipe_args(bart, ["--max_steps", "-1", "--num_train_epochs", "2"])
    assert training.max_steps == -1 and training.num_train_epochs == 2


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (b"learning_rate: 1e-4\nrun_name: caf\xe9\n", r"not UTF-8 text: byte 0xe9 on line 2"),
        (b"learning_rate: 1e-4\nmax_steps: [1, 2\n", r"not valid YAML on line \d+"),
        (b"learning_rate: 1e-4\n  bad indent: 1\n", r"not valid YAML on line 2"),
        (b"just a string\n", r"must hold a mapping .* got a str"),
    ],
    ids=["non-utf8", "unclosed-list", "bad-indent", "scalar"],
)
def test_unreadable_yaml_is_one_error_naming_the_file_and_the_cause(bart, tmp_path, content, cause):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"--config.*run\.yaml.*{cause}") as caught:
        parse_recipe_args(bart, ["--config", str(path)])
    assert "\n" not in str(caught.value)


def test_config_that_is_a_directory_is_named_as_such(bart, tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        parse_recipe_args(bart, ["--config", str(tmp_path)])


def test_recipe_prints_one_line_and_exits_2_on_bad_arguments(tmp_path):
    """As a user runs it: no traceback, one line on stderr naming the problem, before any training."""
    command = [sys.executable, str(RECIPES / "bart_pretrain.py"), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run([*command, "--max_steps", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("bart_pretrain.py: error: `max_steps` must be > 0")
    assert not (tmp_path / "out").exists()


def test_objective_flag_the_collator_rejects_is_one_line_before_training(bart, tmp_path, capsys):
    """`--poisson_lambda 100` passes the parser; the collator's check ends the run before any step, in one line."""
    with pytest.raises(SystemExit) as stopped:
        main(bart, ["--output_dir", str(tmp_path), *TINY_RUN, "--poisson_lambda", "100"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err  # also holds `datasets` progress bars
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("could never be filled.")
    assert "error: `poisson_lambda` must be in" in err.strip().splitlines()[-1]
    assert not (tmp_path / "trainer_state.json").exists()
