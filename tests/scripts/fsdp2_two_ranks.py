"""Launched by tests/integration/test_engines_fsdp2.py:
``torchrun --nproc_per_node 2 -m tests.scripts.fsdp2_two_ranks OUTPUT_DIR``.

Raw FSDP2 (``fully_shard``, gloo, CPU) on a tiny BERT, driven step by step with the real stability callbacks and
hand-built `TrainerState`/`TrainerControl` (`Trainer` refuses FSDP on CPU). Each rank writes
``OUTPUT_DIR/rank{N}.pt`` with what the test checks:

- healthy step: the callbacks' grad norm and telemetry's per-tensor norms against the norms of the full
  (gathered) gradients;
- a NaN written into one element of rank 1's shard only: the step is skipped on both ranks, local parameters
  and sharded Adam state bit-identical;
- a rollback snapshot (cpu and disk storage) of the DTensor parameters and sharded Adam state, restored after
  two more updates: bit-identical.

The script ends without a collective of its own (see rollback_two_ranks.py).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import TrainerControl, TrainerState, TrainingArguments, default_data_collator  # noqa: E402

from hf_stability.callbacks import LossScaleTelemetryCallback, SkipNonFiniteCallback  # noqa: E402
from hf_stability.snapshots import SnapshotStore, restore_training_state  # noqa: E402
from hf_stability.step.channel import StepSignals, global_grad_norm, gradients  # noqa: E402
from hf_stability.step.telemetry import fp16_pressure  # noqa: E402
from tests.testing_utils import bert_tokenizer, mlm_dataset, tiny_bert, training_args  # noqa: E402

BATCH = 4


def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Clones of this rank's parameter shards and Adam state (moments and step counts)."""
    tensors = [p.detach().to_local().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        for value in state.values():
            tensors.append((value.to_local() if hasattr(value, "to_local") else value).detach().clone())
    return tensors


def identical(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = bert_tokenizer()
    model = tiny_bert(tokenizer)  # same seed, same weights on both ranks
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = mlm_dataset(tokenizer, rows=64)
    batches = [default_data_collator([rows[i] for i in range(start, start + BATCH)]) for start in range(0, 64, BATCH)]
    args = training_args(output_dir, args_class=TrainingArguments, max_steps=20, logging_steps=1)
    state = TrainerState(max_steps=20, logging_steps=1, is_world_process_zero=rank == 0)
    control = TrainerControl()
    skip = SkipNonFiniteCallback()
    telemetry = LossScaleTelemetryCallback(log_fp16_pressure=True, log_layer_grad_norms=True)
    skip.on_train_begin(args, state, control, model=model)
    telemetry.on_train_begin(args, state, control, model=model, optimizer=optimizer)  # as Trainer calls it
    result: dict = {}

    def step(poison: bool = False) -> None:
        """One training step as Trainer runs it, each rank on its own batch."""
        model.train()
        batch = batches[(2 * state.global_step + rank) % len(batches)]
        model(**batch).loss.backward()
        if poison and rank == 1:
            next(g for g in gradients(model.parameters()) if g.to_local().numel()).to_local().view(-1)[0] = float("nan")
        if not poison and "norm" not in result:
            full = [g.full_tensor() for g in gradients(model.parameters())]
            result["full_grads"] = full
            result["expected_layer_norms"] = torch.stack([g.float().norm() for g in full])
            result["expected_norm"] = torch.linalg.vector_norm(result["expected_layer_norms"])
            result["norm"] = global_grad_norm(gradients(model.parameters()))
        kwargs = {"model": model, "optimizer": optimizer}
        skip.on_pre_optimizer_step(args, state, control, **kwargs)
        telemetry.on_pre_optimizer_step(args, state, control, **kwargs)
        optimizer.step()
        skip.on_optimizer_step(args, state, control, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1

    step()
    metrics = StepSignals.for_model(model).guard.metrics()
    result["layer_norms"] = torch.tensor(
        [value for key, value in metrics.items() if key.startswith("stability/grad_norm/")]
    )
    result["fp16_metrics"] = {key: value for key, value in metrics.items() if "fp16" in key}
    expected = fp16_pressure(result.pop("full_grads"), None)
    result["expected_fp16_metrics"] = {key: value.item() for key, value in expected.items()}

    step()  # Adam state exists from here on
    before = local_state(model, optimizer)
    step(poison=True)
    result["skipped"] = StepSignals.for_model(model).skipped(state.global_step)
    result["skipped_steps"] = skip.skipped_steps
    result["unchanged_across_poisoned_step"] = identical(before, local_state(model, optimizer))
    step()
    result["changed_after"] = not identical(before, local_state(model, optimizer))

    for storage in ("cpu", "disk"):
        store = SnapshotStore(1, storage, os.path.join(output_dir, f"snapshots-rank{rank}"))
        saved = local_state(model, optimizer)
        snapshot = store.capture(state.global_step, model, optimizer, None, 1.0, trusted=True)
        step()
        step()
        moved = not identical(saved, local_state(model, optimizer))
        restore_training_state(snapshot, model, optimizer, None)
        result[f"{storage}_restore_exact"] = moved and identical(saved, local_state(model, optimizer))
    torch.save(result, os.path.join(output_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
