"""Launched by tests/integration/test_engines.py:
``torchrun --nproc_per_node 2 -m tests.scripts.deepspeed_skip_two_ranks OUT``.

What DeepSpeed's own overflow skip leaves untouched, measured per ZeRO stage and precision on DeepSpeed's CPU
accelerator (gloo, 2 processes, client AdamW + LambdaLR). For each configuration: two healthy steps (Adam state
exists), then rank 1 alone gets a NaN loss. Each rank records whether, across that step, its module parameters
(the local ZeRO-3 partition), its fp32 master partitions (the tensors the inner optimizer steps), every optimizer
state tensor (moments, step count), the LR scheduler and the engine's counters stayed bit-identical, and what the
engine reported (``was_step_applied()``, ``skipped_steps``, ``get_global_grad_norm()``); then whether the next
healthy step changed all of them. ``OUT/rank{N}.pt``. The first run JIT-compiles DeepSpeed's shared-memory op
(~2.5 min); later runs take ~1 min for all seven configurations.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

os.environ.setdefault("DS_BUILD_OPS", "0")

import deepspeed  # noqa: E402
import torch  # noqa: E402
from transformers import default_data_collator  # noqa: E402

from tests.testing_utils import bert_tokenizer, mlm_dataset, tiny_bert  # noqa: E402

# "bf16-nocheck": bf16 with `check_grad_overflow: false`, the setting under which DeepSpeed is documented not to skip.
CONFIGS = [(stage, precision) for stage in (1, 2, 3) for precision in ("fp32", "bf16")] + [(2, "bf16-nocheck")]


def local_state(engine) -> dict[str, list[torch.Tensor]]:
    """Clones of this rank's module parameters (or ZeRO-3 partitions), fp32 master partitions and optimizer state."""
    zero = engine.optimizer
    # ZeRO-1/2 keep them in `single_partition_of_fp32_groups`; ZeRO-3 in `fp32_partitioned_groups_flat`, put into
    # the inner optimizer's param_groups only around its step (DeepSpeed 0.19 stage3.py `_optimizer_step`).
    flat = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    params = [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]
    masters = [p.detach().clone() for p in flat]
    states = [torch.as_tensor(v).detach().clone() for s in zero.optimizer.state.values() for v in s.values()]
    return {"parameters": params, "fp32_masters": masters, "optimizer_state": states}


def scheduler_state(engine) -> tuple[int, list[float]]:
    return engine.lr_scheduler.state_dict()["last_epoch"], engine.lr_scheduler.get_last_lr()


def tiny_engine(tokenizer, zero: dict, bf16: dict):
    """A DeepSpeed engine over a tiny BERT, AdamW and a decaying LambdaLR, micro-batches of 4 (the raw-engine runs)."""
    model = tiny_bert(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "bf16": bf16}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def run_configs(output_dir: str, configs: list[tuple[int, str]], run: Callable[..., dict[str, object]]) -> None:
    """``run(stage, precision, tokenizer, batches, rank)`` per config on this rank; the results to ``rank<r>.pt``.

    ``batches[2 * i + rank]`` is rank ``rank``'s batch of step ``i``: the two ranks train on different rows.
    """
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    tokenizer = bert_tokenizer()
    rows = mlm_dataset(tokenizer, rows=64)
    batches = [default_data_collator([rows[i] for i in range(start, start + 4)]) for start in range(0, 64, 4)]
    result = {f"zero{stage}-{precision}": run(stage, precision, tokenizer, batches, rank) for stage, precision in
              configs}
    torch.save(result, os.path.join(output_dir, f"rank{rank}.pt"))


def run(stage: int, precision: str, tokenizer, batches, rank: int) -> dict[str, object]:
    bf16 = {"enabled": precision != "fp32", "check_grad_overflow": precision != "bf16-nocheck"}
    engine = tiny_engine(tokenizer, {"stage": stage}, bf16)

    def step(index: int, poison: bool = False) -> None:
        batch = {k: v.to(engine.device) for k, v in batches[2 * index + rank].items()}
        loss = engine(**batch).loss
        if poison and rank == 1:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()

    step(0)
    step(1)
    before, before_scheduler = local_state(engine), scheduler_state(engine)
    step(2, poison=True)
    after, after_scheduler = local_state(engine), scheduler_state(engine)
    outcome: dict[str, object] = {
        key: len(before[key]) == len(after[key]) and all(map(torch.equal, before[key], after[key])) for key in before
    }
    outcome["finite"] = all(bool(torch.isfinite(t).all()) for t in after["fp32_masters"])
    outcome["lr_scheduler_held"] = before_scheduler == after_scheduler
    outcome["step_applied"] = engine.was_step_applied()
    outcome["skipped_steps"] = engine.skipped_steps
    outcome["grad_norm"] = engine.get_global_grad_norm()
    step(3)
    outcome["applied_after"], outcome["grad_norm_after"] = engine.was_step_applied(), engine.get_global_grad_norm()
    later = local_state(engine)
    outcome["changed_after"] = {key: not all(map(torch.equal, after[key], later[key])) for key in after}
    engine.destroy()
    return outcome


def main(output_dir: str) -> None:
    run_configs(output_dir, CONFIGS, run)


if __name__ == "__main__":
    main(sys.argv[1])
