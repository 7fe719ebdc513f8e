import pytest
from transformers import HfArgumentParser

from hf_stability import SkipNonFiniteCallback, SpikeRollbackCallback, StabilityConfig


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
        # Values that would silently switch protection off, or fail later with a TypeError in a comparison.
        ({"spike_sigma": float("nan")}, "spike_sigma"),
        ({"spike_sigma": float("inf")}, "spike_sigma"),
        ({"spike_sigma": "abc"}, "spike_sigma"),
        ({"spike_sigma": None}, "spike_sigma"),
        ({"spike_sigma": True}, "spike_sigma"),
        ({"rollback_lr_factor": 1.5}, "rollback_lr_factor"),
        ({"rollback_lr_factor": float("nan")}, "rollback_lr_factor"),
        ({"rollback_lr_factor": "half"}, "rollback_lr_factor"),
        ({"max_rollbacks": "many"}, "max_rollbacks"),
        ({"snapshot_interval": 2.5}, "snapshot_interval"),
        ({"spike_window": "wide"}, "spike_window"),
        ({"max_consecutive_skips": float("inf")}, "max_consecutive_skips"),
    ],
)
def test_impossible_configs_are_rejected_naming_the_field(tmp_path, overrides, named):
    with pytest.raises(ValueError, match=named):
        StabilityConfig(output_dir=str(tmp_path), **overrides)


def test_yaml_values_are_validated_and_numeric_strings_converted(tmp_path):
    parser = HfArgumentParser(StabilityConfig)
    yaml_file = tmp_path / "c.yaml"
    # PyYAML reads `1e-1` (no dot) as a string: it spells a number, so it is taken as one.
    yaml_file.write_text(f"output_dir: {tmp_path}\nspike_sigma: 1e+1\nrollback_lr_factor: 5e-1\nmax_rollbacks: '3'\n")
    (config,) = parser.parse_yaml_file(str(yaml_file))
    assert (config.spike_sigma, config.rollback_lr_factor, config.max_rollbacks) == (10.0, 0.5, 3)
    for line, named in [("spike_sigma: abc", "spike_sigma"), ("spike_sigma: .nan", "spike_sigma"),
                        ("rollback_lr_factor: 2", "rollback_lr_factor")]:
        yaml_file.write_text(f"output_dir: {tmp_path}\n{line}\n")
        with pytest.raises(ValueError, match=named):
            parser.parse_yaml_file(str(yaml_file))


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: SpikeRollbackCallback(sigma="abc"), "sigma"),
        (lambda: SpikeRollbackCallback(sigma=float("inf")), "sigma"),
        (lambda: SpikeRollbackCallback(sigma=float("nan")), "sigma"),
        (lambda: SpikeRollbackCallback(lr_factor=1.5), "lr_factor"),
        (lambda: SpikeRollbackCallback(lr_factor="x"), "lr_factor"),
        (lambda: SpikeRollbackCallback(max_rollbacks=1.5), "max_rollbacks"),
        (lambda: SpikeRollbackCallback(snapshot_keep="two"), "snapshot_keep"),
        (lambda: SpikeRollbackCallback(window="wide"), "window"),
        (lambda: SkipNonFiniteCallback(max_consecutive_skips="x"), "max_consecutive_skips"),
        (lambda: SkipNonFiniteCallback(max_consecutive_skips=float("inf")), "max_consecutive_skips"),
        (lambda: SkipNonFiniteCallback(max_consecutive_skips=0), "max_consecutive_skips"),
    ],
)
def test_callbacks_built_directly_validate_alike(build, named):
    with pytest.raises(ValueError, match=named):
        build()
