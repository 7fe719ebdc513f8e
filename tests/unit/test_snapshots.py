"""Snapshot capture/restore of a real tiny BERT, AdamW, LambdaLR, GradScaler and RNGs, in host memory and on disk."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from transformers import default_data_collator, get_linear_schedule_with_warmup

from hf_stability.snapshots import SnapshotStore, restore_training_state
from tests.testing_utils import mlm_dataset, tiny_bert


class ScaledOptimizer:
    """What accelerate hands a callback: an optimizer wrapper with ``.optimizer`` and ``.scaler``."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer = optimizer
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()


@pytest.fixture()
def run(bert_tokenizer):
    model = tiny_bert(bert_tokenizer)
    batches = [default_data_collator([row for row in mlm_dataset(bert_tokenizer, rows=32).select(range(i, i + 4))])
               for i in range(0, 32, 4)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=20)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    wrapped = ScaledOptimizer(optimizer, scaler)

    def train(steps: int) -> None:
        for _ in range(steps):
            batch = batches[random.randrange(len(batches))]
            scaler.scale(model(**batch).loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    return model, wrapped, scheduler, train


def full_state(model, wrapped, scheduler) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(wrapped.optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "scaler": wrapped.scaler.state_dict(),
        "draws": (random.random(), np.random.random(), torch.rand(3)),
    }


def assert_equal_state(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key in state_a[index]:
            assert torch.equal(state_a[index][key], state_b[index][key]), (index, key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scheduler"] == b["scheduler"]
    assert a["scaler"] == b["scaler"]
    assert a["draws"][0] == b["draws"][0] and a["draws"][1] == b["draws"][1]
    assert torch.equal(a["draws"][2], b["draws"][2])


def capture_and_remember(store, step, model, wrapped, scheduler):
    """Capture, then record the state with RNG draws that the restore must reproduce."""
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    snapshot = store.capture(step, model, wrapped, scheduler, lr_scale=1.0, trusted=True)
    expected = full_state(model, wrapped, scheduler)
    random.setstate(rng[0]), np.random.set_state(rng[1]), torch.set_rng_state(rng[2])
    return snapshot, expected


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_restore_is_bit_exact_and_the_snapshot_is_never_aliased(run, storage, tmp_path):
    model, wrapped, scheduler, train = run
    random.seed(0)
    train(3)
    store = SnapshotStore(keep=2, storage=storage, directory=tmp_path / "snaps")
    snapshot, expected = capture_and_remember(store, 3, model, wrapped, scheduler)
    train(4)
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, expected["model"][
        "bert.embeddings.word_embeddings.weight"]), "training should have moved the weights"
    assert wrapped.scaler.state_dict() != expected["scaler"], "the scaler should have grown its scale"
    restore_training_state(snapshot, model, wrapped, scheduler)
    assert_equal_state(full_state(model, wrapped, scheduler), expected)
    # Training on from the restored state must not write into the snapshot: a second restore is exact too.
    train(2)
    restore_training_state(snapshot, model, wrapped, scheduler)
    assert_equal_state(full_state(model, wrapped, scheduler), expected)
    if storage == "disk":
        assert (tmp_path / "snaps" / "step-3" / "tensors.safetensors").is_file()


def test_tied_weights_are_stored_once(run, tmp_path):
    model, wrapped, scheduler, _ = run
    snapshot = SnapshotStore(keep=1).capture(0, model, wrapped, scheduler, lr_scale=1.0, trusted=True)
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is embeddings
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
    assert snapshot.nbytes == sum(t.numel() * t.element_size() for t in unique.values())
    aliases = snapshot.structure["model_aliases"]
    assert aliases["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"


def test_restoring_a_snapshot_from_before_the_first_step_empties_adam_state(run):
    model, wrapped, scheduler, train = run
    snapshot = SnapshotStore(keep=1).capture(0, model, wrapped, scheduler, lr_scale=1.0, trusted=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train(2)
    assert wrapped.optimizer.state
    restore_training_state(snapshot, model, wrapped, scheduler)
    assert not wrapped.optimizer.state
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert scheduler.last_epoch == 0
    train(1)  # Adam initialises its state lazily again
    assert all(int(s["step"]) == 1 for s in wrapped.optimizer.state.values())


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_store_keeps_trusted_snapshots_and_drops_untrusted_ones(run, storage, tmp_path):
    model, wrapped, scheduler, _ = run
    directory = tmp_path / "stability_snapshots" / "rank-0"
    store = SnapshotStore(keep=2, storage=storage, directory=directory)
    for step, trusted in [(0, True), (10, False), (20, False)]:
        store.capture(step, model, wrapped, scheduler, lr_scale=1.0, trusted=trusted)
    store.trust_through(11)  # steps after 10 were judged healthy: 10 is trusted, 20 not yet
    assert [(s.step, s.trusted) for s in store.snapshots] == [(0, True), (10, True), (20, False)]
    assert store.newest_trusted().step == 10
    store.trust_through(21)  # 20 trusted too: only the newest `keep` trusted ones stay
    assert [s.step for s in store.snapshots] == [10, 20]
    store.capture(20, model, wrapped, scheduler, lr_scale=1.0, trusted=True)  # a re-capture replaces, never stacks
    assert [s.step for s in store.snapshots] == [10, 20]
    store.capture(30, model, wrapped, scheduler, lr_scale=1.0, trusted=False)
    store.discard_untrusted()
    assert [s.step for s in store.snapshots] == [10, 20]
    if storage == "disk":
        assert sorted(p.name for p in directory.iterdir()) == ["step-10", "step-20"]
    store.clear()
    assert store.snapshots == [] and not any(tmp_path.iterdir())  # stability_snapshots/ goes too


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"keep": 0}, "keep"), ({"keep": 1, "storage": "gpu"}, "storage"), ({"keep": 1, "storage": "disk"}, "directory")],
)
def test_bad_store_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SnapshotStore(**kwargs)


def test_a_failed_disk_write_is_removed_and_older_snapshots_stay_valid(run, tmp_path, caplog):
    """A real failed write: ``structure.pt`` cannot be created (a directory is in its way) after the tensors are."""
    model, wrapped, scheduler, train = run
    random.seed(0)
    train(3)
    store = SnapshotStore(keep=2, storage="disk", directory=tmp_path / "snaps")
    snapshot, expected = capture_and_remember(store, 3, model, wrapped, scheduler)
    train(4)
    blocker = tmp_path / "snaps" / "step-7" / "structure.pt"
    blocker.mkdir(parents=True)
    with caplog.at_level("WARNING", logger="hf_stability.snapshots"):
        assert store.capture(7, model, wrapped, scheduler, lr_scale=1.0, trusted=True) is None
    assert "Could not write the rollback snapshot of step 7" in caplog.text and "steps [3]" in caplog.text
    assert [s.step for s in store.snapshots] == [3] and store.newest_trusted() is snapshot
    assert blocker.is_dir()  # what the store did not write is never removed
    restore_training_state(snapshot, model, wrapped, scheduler)
    assert_equal_state(full_state(model, wrapped, scheduler), expected)
    store.clear()
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["step-7"]


def test_clear_removes_only_what_the_store_wrote(run, tmp_path):
    model, wrapped, scheduler, _ = run
    directory = tmp_path / "stability_snapshots" / "rank-0"
    stale = directory / "step-5"  # left by a killed run: removed at the first write
    stale.mkdir(parents=True)
    (stale / "tensors.safetensors").write_bytes(b"partial")
    keep = tmp_path / "stability_snapshots" / "notes.txt"
    keep.write_text("mine")
    store = SnapshotStore(keep=1, storage="disk", directory=directory)
    store.capture(5, model, wrapped, scheduler, lr_scale=1.0, trusted=True)
    assert (directory / "step-5" / "structure.pt").is_file()
    store.clear()
    assert not directory.exists() and keep.read_text() == "mine"


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_tensors_in_param_groups_and_scheduler_state_come_back_as_tensors(bert_tokenizer, storage, tmp_path):
    """A tensor LR (fused AdamW takes one; LambdaLR then keeps tensor ``base_lrs``/``_last_lr``) was restored as the
    snapshot's internal placeholder object, and the next fused step failed on it."""
    model = tiny_bert(bert_tokenizer)
    batch = default_data_collator(list(mlm_dataset(bert_tokenizer, rows=4)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    def train(steps: int) -> None:
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    train(2)
    live_lr = optimizer.param_groups[0]["lr"]
    store = SnapshotStore(keep=1, storage=storage, directory=tmp_path / "snaps")
    snapshot = store.capture(2, model, optimizer, scheduler, lr_scale=1.0, trusted=True)
    expected_lr, expected_scheduler = live_lr.clone(), copy.deepcopy(scheduler.state_dict())
    assert isinstance(expected_scheduler["base_lrs"][0], torch.Tensor)
    train(3)
    assert not torch.equal(live_lr, expected_lr), "the schedule should have moved the LR"
    restore_training_state(snapshot, model, optimizer, scheduler)
    assert optimizer.param_groups[0]["lr"] is live_lr and torch.equal(live_lr, expected_lr)  # in place, as torch does
    restored = scheduler.state_dict()
    assert restored.keys() == expected_scheduler.keys()
    for key, value in expected_scheduler.items():
        if key in ("base_lrs", "_last_lr"):
            assert all(isinstance(r, torch.Tensor) and torch.equal(r, e) for r, e in zip(restored[key], value,
                                                                                        strict=True)), key
        else:
            assert restored[key] == value, key
    train(1)  # the fused step runs on the restored tensor LR
    assert scheduler.last_epoch == 3
