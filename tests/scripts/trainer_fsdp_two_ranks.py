"""Launched by tests/integration/test_engines_fsdp2.py:
``torchrun --nproc_per_node 2 -m tests.scripts.trainer_fsdp_two_ranks OUT``.

The real `Trainer` + accelerate FSDP (gloo, CPU, 2 ranks) with the stability callbacks. One test-only override
makes that possible (`accelerate_fsdp_on_cpu`); everything after it is accelerate's and Trainer's own path.

1. FSDP version 1: `StabilityTrainer` and a plain `Trainer`'s `SkipNonFiniteCallback` refuse in one line.
2. FSDP2 (`StabilityTrainer`): rank 1 alone gets a NaN forward pass at step ``POISONED`` (both ranks skip, local
   shards and sharded Adam state bit-identical across it); only rank 1's shards are thrown at step ``THROWN``
   (one rollback, restoring each rank's shards and Adam state of the snapshot bit for bit).

Each rank writes ``OUT/rank{N}.pt``; the script ends without a collective of its own (see rollback_two_ranks.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_stability import SkipNonFiniteCallback, SpikeRollbackCallback, StabilityTrainer  # noqa: E402
from hf_stability.callbacks.order import find_callback  # noqa: E402
from hf_stability.engines import UnsupportedEngineError  # noqa: E402
from tests.testing_utils import PoisonActivations, bert_tokenizer, mlm_dataset, rank, tiny_bert, training_args  # noqa: E402

POISONED = 3
SNAPSHOT = 20
THROWN = 30


@contextmanager
def accelerate_fsdp_on_cpu() -> Iterator[None]:
    """Test-only: let accelerate's state take its FSDP branch on CPU ranks.

    `AcceleratorState.__init__` (accelerate 1.10-1.16) turns a passed ``fsdp_plugin`` into
    ``distributed_type=FSDP`` only for the GPU-like multi-process types; with ``use_cpu`` the type stays
    MULTI_CPU and the plugin is dropped (Trainer then silently runs DDP). This does what that branch does, for
    MULTI_CPU, and nothing else; `torch.distributed.fsdp.fully_shard` itself runs on gloo.
    """
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original


def fsdp_args(output_dir: str, version: int, args_class: type | None = None, **overrides):
    """Arguments asking Trainer for FSDP ``version``; BertLayer wrapped (accelerate's default policy also wraps
    `BertEmbeddings`, whose word embeddings it then shards a second time). Same seed, same weights on both
    ranks, so no ``sync_module_states`` broadcast (FSDP1 refuses it on CPU)."""
    config = {"version": version, "transformer_layer_cls_to_wrap": ["BertLayer"], "sync_module_states": False}
    return training_args(
        output_dir, args_class, per_device_train_batch_size=4, ddp_backend="gloo", fsdp=True, fsdp_config=config,
        **overrides,
    )


def refusal(build: Callable[[], object]) -> str | None:
    """The `UnsupportedEngineError` message ``build`` raised, or None."""
    try:
        build()
    except UnsupportedEngineError as error:
        return str(error)
    return None


def local_state(model: torch.nn.Module, optimizer) -> list[torch.Tensor]:
    """Clones of this rank's parameter shards and Adam state (moments and step counts)."""
    tensors = [p.detach().to_local().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        for value in state.values():
            tensors.append((value.to_local() if hasattr(value, "to_local") else value).detach().clone())
    return tensors


def identical(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


class Probe(TrainerCallback):
    """Records local shards around the poisoned step, at the snapshot step and right after the rollback
    (which the test checks happened at the end of step ``THROWN + 1``, to step ``SNAPSHOT``), and throws rank 1's
    shards (N(0, 4) noise) after the update of step ``THROWN``."""

    def __init__(self) -> None:
        self.around: dict[str, list[torch.Tensor]] = {}
        self.result: dict[str, object] = {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == POISONED:
            self.around["before"] = local_state(model, optimizer)
        if state.global_step == THROWN + 1:  # the spike of step THROWN + 1 rolled back at its end
            self.result["restored_exact"] = identical(self.around["snapshot"], local_state(model, optimizer))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == POISONED + 1:
            unchanged = identical(self.around["before"], local_state(model, optimizer))
            self.result["unchanged_across_poisoned_step"] = unchanged
        if state.global_step == POISONED + 2:
            self.result["changed_after"] = not identical(self.around["before"], local_state(model, optimizer))
        if state.global_step == SNAPSHOT:
            self.around["snapshot"] = local_state(model, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == THROWN and rank() == 1:
            generator = torch.Generator().manual_seed(THROWN)
            with torch.no_grad():
                for parameter in model.parameters():
                    local = parameter.to_local()
                    local.add_(torch.randn(local.shape, generator=generator) * 2.0)


def main(output_dir: str) -> None:
    tokenizer = bert_tokenizer()
    dataset = mlm_dataset(tokenizer, rows=128)
    result: dict[str, object] = {}
    with accelerate_fsdp_on_cpu():
        args = fsdp_args(output_dir, 1)
        model = tiny_bert(tokenizer, tied=False)
        result["fsdp1_stability_trainer"] = refusal(lambda: StabilityTrainer(model, args, train_dataset=dataset))
        plain = Trainer(
            tiny_bert(tokenizer, tied=False),
            fsdp_args(output_dir, 1, TrainingArguments, max_steps=2),
            train_dataset=dataset,
            callbacks=[SkipNonFiniteCallback()],
        )
        # FSDP1's own wrapping fails on CPU ("Inconsistent compute device and `device_id`: cpu vs cpu:0") before
        # train() reaches on_train_begin, so the hook is dispatched as train() does, with the real FSDP1 state.
        begin = plain.callback_handler.on_train_begin
        result["fsdp1_callback"] = refusal(lambda: begin(plain.args, plain.state, plain.control))
        AcceleratorState._reset_state()

        args = fsdp_args(output_dir, 2, max_steps=40, logging_steps=1, max_grad_norm=0.0, snapshot_interval=10,
                         spike_window=16, spike_warmup=8)
        probe = Probe()
        trainer = StabilityTrainer(tiny_bert(tokenizer, tied=False), args, train_dataset=dataset,
                                   callbacks=[PoisonActivations([POISONED], ranks=[1]), probe])
        result["is_fsdp2"] = trainer.accelerator.is_fsdp2
        trainer.train()
    result.update(probe.result)
    result["log_history"] = trainer.state.log_history
    result["skipped_steps"] = find_callback(trainer.callback_handler.callbacks, SkipNonFiniteCallback).skipped_steps
    result["rollbacks"] = find_callback(trainer.callback_handler.callbacks, SpikeRollbackCallback).rollbacks
    torch.save(result, os.path.join(output_dir, f"rank{rank()}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
