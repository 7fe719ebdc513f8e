"""Launched by tests/integration/test_engines.py:
``torchrun --nproc_per_node 2 -m tests.scripts.deepspeed_rollback_two_ranks OUT``.

`DeepSpeedSnapshotStore` restores a DeepSpeed ZeRO engine bit for bit, per stage and precision, on DeepSpeed's CPU
accelerator (gloo, 2 processes, client AdamW + LambdaLR). For each of ZeRO-1/2/3 in fp32 and bf16: two healthy
steps, one snapshot into host memory and one onto disk, and a record of the state the snapshot must hold (this
rank's module parameters or ZeRO-3 partitions, the whole weights, fp32 master partitions, every inner optimizer
state tensor (moments, step), param-group LRs, the engine's counters, its LR scheduler, its loss scaler); then a
loss spike (x1000) on rank 1 alone and a healthy step; then the restore from host memory, the record taken again,
one more step (the run goes on), and the restore from disk. ZeRO-3 runs with ``stage3_param_persistence_threshold:
0`` so that every weight is partitioned (the Trainer test covers the persistent ones). ``OUT/rank{N}.pt``.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("DS_BUILD_OPS", "0")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_stability.deepspeed import ENGINE_COUNTERS, DeepSpeedSnapshotStore  # noqa: E402
from tests.scripts.deepspeed_skip_two_ranks import run_configs, tiny_engine  # noqa: E402
from tests.testing_utils import rank  # noqa: E402

CONFIGS = [(stage, precision) for stage in (1, 2, 3) for precision in ("fp32", "bf16")]


def masters(zero) -> list[torch.Tensor]:
    flat = getattr(zero, "fp32_partitioned_groups_flat", None)
    return list(flat if flat is not None else zero.single_partition_of_fp32_groups)


def full_weights(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """The whole weights: ZeRO-3's partitions all-gathered by hand (whatever DeepSpeed has gathered), else clones."""
    weights = []
    for p in parameters:
        partition = getattr(p, "ds_tensor", None)
        if partition is None:
            weights.append(p.detach().clone())
            continue
        parts = [torch.empty_like(partition) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, partition.detach())
        weights.append(torch.cat(parts)[: p.ds_numel].view(p.ds_shape))
    return weights


def record(engine, scheduler=None) -> dict[str, object]:
    """Clones of everything a rollback must put back, as this rank holds it (``scheduler``: the engine's if None).

    ``visible``: whether every weight the module holds whole (ZeRO-1/2: all; ZeRO-3: the persistent ones and any
    still gathered) is the whole weight its partitions make, i.e. what the next forward computes with.
    """
    zero = engine.optimizer
    scheduler = scheduler or engine.lr_scheduler
    parameters = list(engine.module.parameters())
    weights = full_weights(parameters)
    return {
        "parameters": [getattr(p, "ds_tensor", p).detach().clone() for p in parameters],
        "gathered": weights,
        "visible": all(torch.equal(p.data, w) for p, w in zip(parameters, weights, strict=True) if p.data.numel()),
        "fp32_masters": [m.detach().clone() for m in masters(zero)],
        "optimizer_state": [torch.as_tensor(v).detach().clone() for m in masters(zero)
                            for v in zero.optimizer.state[m].values()],
        "lr": [group["lr"] for group in zero.optimizer.param_groups],
        "counters": [getattr(engine, name) for name in ENGINE_COUNTERS],
        "scheduler": scheduler.state_dict(),
        "loss_scale": (zero.loss_scaler.cur_scale, getattr(zero.loss_scaler, "cur_iter", None)),
    }


def same(first: dict[str, object], second: dict[str, object]) -> dict[str, bool]:
    """Per key: bit-identical (tensors with `torch.equal`, the rest with ``==``)."""
    def equal(a, b) -> bool:
        if isinstance(a, list):
            return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b

    return {key: equal(first[key], second[key]) for key in first}


def bit16_from_masters(zero) -> bool:
    """Whether this rank's bit16 partitions are the cast of its fp32 masters (what DeepSpeed's step leaves)."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        pairs = list(zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat, strict=True))
    else:
        rank = torch.distributed.get_rank()
        pairs = [(groups[rank], fp32) for groups, fp32 in
                 zip(zero.parallel_partitioned_bit16_groups, zero.single_partition_of_fp32_groups, strict=True)]
    return all(torch.equal(bit16, fp32.to(bit16.dtype)) for bit16, fp32 in pairs)


class SpikeLoss(TrainerCallback):
    """Scales the MLM logits by 50 during optimizer step ``step`` on ``ranks``: a finite loss spike (after the last
    LayerNorm, which would undo an earlier scaling)."""

    def __init__(self, step: int, ranks: list[int]) -> None:
        self.step, self.ranks = step, set(ranks)
        self._handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step and rank() in self.ranks:
            module = dict(model.named_modules())["cls"]
            self._handle = module.register_forward_hook(lambda module, inputs, output: output * 50)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class EngineRecord(TrainerCallback):
    """`record` of ``trainer``'s engine at the end of the given steps, after the stability callbacks (which run
    first: they have a priority). Set ``trainer`` before training."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.records = steps, {}
        self.trainer = None

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if state.global_step in self.steps:
            self.records[state.global_step] = record(self.trainer.model_wrapped, lr_scheduler)

    def rollback_outcome(self, snapshot_step: int, rollback_step: int, lr_factor: float) -> dict[str, object]:
        """Whether the state after the rollback of ``rollback_step`` is the one recorded at ``snapshot_step``: bit
        for bit, but for the LR (cut by ``lr_factor``) and the scheduler (its position only: its LRs are cut)."""
        saved, restored = self.records[snapshot_step], self.records[rollback_step]
        exact = ("lr", "scheduler")
        return {
            "restored": same({k: v for k, v in saved.items() if k not in exact},
                             {k: v for k, v in restored.items() if k not in exact}),
            "visible": restored["visible"],
            "lr_cut": restored["lr"] == [lr * lr_factor for lr in saved["lr"]],
            "scheduler_position": all(saved["scheduler"][k] == restored["scheduler"][k]
                                      for k in ("last_epoch", "_step_count")),
        }


def run(stage: int, precision: str, tokenizer, batches, rank: int, output_dir: str) -> dict[str, object]:
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    engine = tiny_engine(tokenizer, zero, {"enabled": precision == "bf16"})

    def step(index: int, spike: bool = False) -> None:
        batch = {k: v.to(engine.device) for k, v in batches[2 * index + rank].items()}
        loss = engine(**batch).loss
        engine.backward(loss * 1000 if spike and rank == 1 else loss)
        engine.step()

    in_memory = DeepSpeedSnapshotStore(lambda: engine, keep=1)
    on_disk = DeepSpeedSnapshotStore(lambda: engine, keep=1, storage="disk",
                                     directory=os.path.join(output_dir, "snapshots", f"{stage}-{precision}-rank{rank}"))
    step(0)
    step(1)
    snapshots = [store.capture(2, engine.module, None, None, lr_scale=1.0, trusted=True)
                 for store in (in_memory, on_disk)]
    saved = record(engine)
    step(2, spike=True)
    step(3)
    outcome: dict[str, object] = {"moved": {k: not v for k, v in same(saved, record(engine)).items()}}
    in_memory.restore(snapshots[0], engine.module, None, None)
    restored = record(engine)
    outcome["restored"] = same(saved, restored)
    outcome["visible"] = restored["visible"]
    outcome["bit16_from_masters"] = bit16_from_masters(engine.optimizer)
    step(4)
    after = record(engine)
    outcome["went_on"] = {k: not v for k, v in same(saved, after).items()}
    outcome["finite"] = all(bool(torch.isfinite(m).all()) for m in after["fp32_masters"])
    on_disk.restore(snapshots[1], engine.module, None, None)
    outcome["restored_from_disk"] = same(saved, record(engine))
    on_disk.clear()
    engine.destroy()
    return outcome


def main(output_dir: str) -> None:
    run_configs(output_dir, CONFIGS, functools.partial(run, output_dir=output_dir))


if __name__ == "__main__":
    main(sys.argv[1])
