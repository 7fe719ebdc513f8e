"""Rollback snapshots read back never run code: a snapshot file replaced by a pickle that would is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from hf_stability import StabilityTrainer
from hf_stability.snapshots import SnapshotStore, UnsafeSnapshotError, restore_training_state
from tests.rollback_faults import NanWeights
from tests.testing_utils import mlm_dataset, tiny_bert, training_args


class WritesMarker:
    """Unpickling this writes a file: what a planted snapshot would do instead of restoring state."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def plant(snapshot_dir: Path, marker: Path) -> int:
    """Replace every ``structure.pt`` under ``snapshot_dir`` by a pickle that writes ``marker`` when loaded."""
    planted = 0
    for path in snapshot_dir.rglob("structure.pt"):
        path.write_bytes(pickle.dumps({"rng": WritesMarker(marker)}, protocol=2))
        planted += 1
    return planted


def test_a_planted_snapshot_is_refused_and_runs_no_code(bert_tokenizer, tmp_path):
    model = tiny_bert(bert_tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    store = SnapshotStore(keep=1, storage="disk", directory=tmp_path / "snaps")
    snapshot = store.capture(0, model, optimizer, None, lr_scale=1.0, trusted=True)
    assert snapshot is not None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    marker = tmp_path / "marker"
    assert plant(tmp_path / "snaps", marker) == 1
    with pytest.raises(UnsafeSnapshotError, match=r"step-0/structure\.pt: refusing to load this rollback snapshot"):
        restore_training_state(snapshot, model, optimizer, None)
    assert not marker.exists()
    assert not torch.equal(next(model.parameters()), next(iter(before.values()))), "nothing may be restored"


class PlantAt(TrainerCallback):
    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker, self.planted = step, marker, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.planted = plant(Path(args.output_dir) / "stability_snapshots", self.marker)


def test_a_rollback_refuses_a_planted_snapshot_in_the_output_directory(bert_tokenizer, tmp_path):
    marker = tmp_path / "marker"
    planter = PlantAt(4, marker)
    args = training_args(tmp_path / "out", max_steps=8, snapshot_storage="disk", snapshot_interval=2,
                         spike_check_interval=1)
    trainer = StabilityTrainer(tiny_bert(bert_tokenizer), args, train_dataset=mlm_dataset(bert_tokenizer, rows=64),
                               callbacks=[planter, NanWeights([5])])
    with pytest.raises(UnsafeSnapshotError, match="refusing to load this rollback snapshot"):
        trainer.train()
    assert planter.planted >= 1
    assert not marker.exists()


class NumpyFactor:
    """An LR lambda object: `LambdaLR` stores its ``__dict__``, here a numpy scalar (not plain data)."""

    def __init__(self) -> None:
        import numpy as np

        self.factor = np.float64(1.0)

    def __call__(self, step: int) -> float:
        return float(self.factor)


def test_state_that_is_not_plain_data_is_refused_at_the_first_disk_snapshot(bert_tokenizer, tmp_path):
    model = tiny_bert(bert_tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, NumpyFactor())
    store = SnapshotStore(keep=1, storage="disk", directory=tmp_path / "snaps")
    with pytest.raises(UnsafeSnapshotError, match="not plain data.*Use snapshot_storage='cpu'"):
        store.capture(0, model, optimizer, scheduler, lr_scale=1.0, trusted=True)
    assert not (tmp_path / "snaps" / "step-0").exists()
