import pytest
from transformers import HfArgumentParser

from hf_stability import StabilityConfig


def test_defaults_match_the_contract(tmp_path):
    config = StabilityConfig(output_dir=str(tmp_path))
    assert config.skip_nonfinite and config.spike_rollback
    assert (config.spike_metric, config.spike_window, config.spike_warmup, config.spike_sigma) == ("loss", 128, 64, 6.0)
    assert (config.snapshot_interval, config.snapshot_keep, config.max_rollbacks) == (100, 2, 5)
    assert (config.rollback_lr_factor, config.max_consecutive_skips, config.spike_check_interval) == (1.0, 50, 10)
    assert config.restore_callback_states_from_checkpoint is True


def test_every_new_field_has_help():
    import dataclasses

    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    new = [f for f in dataclasses.fields(StabilityConfig) if f.name not in inherited]
    assert len(new) >= 14
    assert all(f.metadata.get("help") for f in new)


def test_parses_from_command_line_and_yaml(tmp_path):
    parser = HfArgumentParser(StabilityConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--spike_sigma", "4.5", "--spike_metric", "grad_norm"]
        + ["--skip_nonfinite", "false"]
    )
    assert config.spike_sigma == 4.5 and config.spike_metric == "grad_norm" and config.skip_nonfinite is False
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path}\nsnapshot_interval: 7\nmax_rollbacks: 0\n")
    (config,) = parser.parse_yaml_file(str(yaml_file))
    assert config.snapshot_interval == 7 and config.max_rollbacks == 0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"spike_window": 10, "spike_warmup": 20}, "spike_window"),
        ({"spike_window": 1, "spike_warmup": 1}, "spike_window"),
        ({"spike_check_interval": 0}, "spike_check_interval"),
        ({"spike_sigma": 0.0}, "spike_sigma"),
        ({"spike_sigma": -1.0}, "spike_sigma"),
        ({"snapshot_interval": 0}, "snapshot_interval"),
        ({"snapshot_keep": 0}, "snapshot_keep"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"spike_metric": "perplexity"}, "spike_metric"),
        ({"snapshot_storage": "gpu"}, "snapshot_storage"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"rollback_lr_factor": 0.0}, "rollback_lr_factor"),
    ],
)
def test_impossible_configs_are_rejected_naming_the_field(tmp_path, overrides, named):
    with pytest.raises(ValueError, match=named):
        StabilityConfig(output_dir=str(tmp_path), **overrides)
