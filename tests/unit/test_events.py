import json
import math

import pytest

from hf_stability.events import EVENTS_FILENAME, SUPERSEDED_PREFIX, StabilityEventLog, read_events


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
    with pytest.warns(UserWarning, match="torn last line .* 2"):
        events = read_events(tmp_path)
    assert [e["step"] for e in events] == [1]


EVENT = '{"step": %d, "event": "skip", "reason": "x"}\n'


@pytest.mark.parametrize(
    "bad_line", ["not json", '{"step": 2, "event": "skip"}', "[1, 2]", "\udcff\udcfe binary"], ids=str
)
def test_corrupt_line_anywhere_is_skipped_with_a_warning_naming_it(tmp_path, bad_line):
    path = tmp_path / EVENTS_FILENAME
    data = (EVENT % 1 + bad_line + "\n" + EVENT % 3).encode("utf-8", errors="surrogateescape")
    path.write_bytes(data)
    with pytest.warns(UserWarning, match="corrupt line 2"):
        events = read_events(path)
    assert [e["step"] for e in events] == [1, 3]


def test_start_run_keeps_events_up_to_the_step_and_moves_the_rest_aside_verbatim(tmp_path):
    path = tmp_path / EVENTS_FILENAME
    original = EVENT % 2 + "garbage\n" + EVENT % 4 + EVENT % 7 + '{"step": 9, "ev'
    path.write_text(original)
    with pytest.warns(UserWarning, match=r"moved 3 earlier line\(s\) to stability_events.superseded-.*2 event"):
        aside = StabilityEventLog(tmp_path).start_run(4)
    assert path.read_text() == EVENT % 2 + EVENT % 4
    assert aside.name.startswith(SUPERSEDED_PREFIX)
    assert aside.read_text() == "garbage\n" + EVENT % 7 + '{"step": 9, "ev\n'
    assert StabilityEventLog(tmp_path).start_run(4) is None  # already consistent: untouched, no second file
    assert len(list(tmp_path.glob(f"{SUPERSEDED_PREFIX}*"))) == 1


def test_start_run_of_a_fresh_run_moves_every_earlier_event(tmp_path):
    StabilityEventLog(tmp_path).append(3, "rollback", "spike", restored_step=1)
    with pytest.warns(UserWarning, match="a new run starts"):
        first = StabilityEventLog(tmp_path).start_run(0)
    StabilityEventLog(tmp_path).append(5, "skip", "x")
    with pytest.warns(UserWarning):
        second = StabilityEventLog(tmp_path).start_run(0)
    assert first != second  # a second move never overwrites the first
    assert read_events(tmp_path) == []
    assert [read_events(p)[0]["step"] for p in (first, second)] == [3, 5]
