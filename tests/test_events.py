import json
import math

import pytest

from hf_stability.events import EVENTS_FILENAME, StabilityEventLog, read_events


def test_round_trip_with_non_finite_values(tmp_path):
    log = StabilityEventLog(tmp_path)
    log.append(3, "skip", "nonfinite_grad", loss=math.nan, grad_norm=math.inf, ranks=[1])
    log.append(9, "rollback", "loss_spike", restored_step=5)
    events = read_events(tmp_path)
    assert [e["event"] for e in events] == ["skip", "rollback"]
    assert events[0]["loss"] == "nan" and events[0]["grad_norm"] == "inf" and events[0]["ranks"] == [1]
    assert events[1]["restored_step"] == 5
    for line in (tmp_path / EVENTS_FILENAME).read_text().splitlines():
        json.loads(line)  # strict JSON, no bare NaN


def test_missing_file_means_no_events(tmp_path):
    assert read_events(tmp_path) == []


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    log = StabilityEventLog(tmp_path)
    log.append(1, "skip", "nonfinite_grad")
    with (tmp_path / EVENTS_FILENAME).open("a") as handle:
        handle.write('{"step": 2, "event": "sk')
    with pytest.warns(UserWarning, match="torn last line 2"):
        events = read_events(tmp_path)
    assert [e["step"] for e in events] == [1]


def test_corrupt_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / EVENTS_FILENAME
    event = '{"step": %d, "event": "skip", "reason": "x"}\n'
    path.write_text(event % 1 + "not json\n" + event % 3)
    with pytest.raises(ValueError, match="line 2"):
        read_events(path)


def test_complete_line_missing_required_keys_is_an_error(tmp_path):
    path = tmp_path / EVENTS_FILENAME
    path.write_text('{"step": 1, "event": "skip"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_events(path)
