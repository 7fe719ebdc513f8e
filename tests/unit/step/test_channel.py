"""Collectives put their tensor on the backend's device: CPU for gloo, CUDA for NCCL (which rejects CPU tensors)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hf_stability.step.channel import collective_device, reduce_across_ranks


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [
        ("nccl", "cpu", "cuda"),  # e.g. SkipNonFiniteCallback.on_train_end's CPU flags
        ("nccl", "cuda:1", "cuda:1"),
        ("gloo", "cuda:0", "cpu"),
        ("gloo", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda:0", "cuda:0"),
    ],
)
def test_collective_device_is_the_backends(backend, device, expected):
    assert collective_device(backend, torch.device(device)) == torch.device(expected)


@pytest.fixture
def one_rank_gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_one_rank_group_still_reduces_on_the_backends_device(one_rank_gloo_group):
    """World size 1 takes the same path as several ranks, so one GPU exercises the placement NCCL needs."""
    value = torch.tensor([0.0, 1.0, 0.0])
    reduced = reduce_across_ranks(value, "max")
    assert reduced is not value and reduced.device == value.device
    assert torch.equal(reduced, value)


def test_a_reduction_returns_only_once_gloo_has_let_go_of_its_tensor(one_rank_gloo_group):
    """gloo's worker thread drops a finished work's tensors just after the caller wakes; a drop that comes after the
    interpreter began shutting down aborts the process (pytorch/pytorch#190489). Ours happen before we return."""
    still_held = 0
    for _ in range(2000):  # without the wait, gloo still held 1 to 10 of 2000 here (and 1 in 3 to 5 on two ranks)
        reduced = reduce_across_ranks(torch.ones(3), "max")
        still_held += reduced._use_count() > 1
    assert still_held == 0
