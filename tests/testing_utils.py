"""Shared builders for trainer tests: a tiny real BERT MLM, real tokenized rows, and fault injection.

Everything here is real: the model is `BertForMaskedLM`, rows come from the embedded corpus through
a tokenizer trained on it, and faults are injected into the real backward pass (a gradient hook) or
into a real batch (labels that leave no token to predict, so the mean loss is 0/0 = NaN).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerBase, TrainerCallback, default_data_collator

from hf_stability.collators._common import IGNORE_INDEX
from hf_stability.corpus import default_corpus, split_sentences, train_tokenizer

SEQ_LEN = 32
REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a script a test launches: the repository root leads PYTHONPATH, so ``-m tests.<script>``
    and ``hf_stability`` resolve to this checkout in the child as they do in the test process."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **overrides, "PYTHONPATH": path}


def run_module(module: str, *args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <module> ARGS`` in one CPU process with this checkout's code; return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_two_ranks(module: str, output_dir: object, timeout: int) -> str:
    """Run ``python -m <module> OUTPUT_DIR`` on 2 CPU ranks under torchrun; assert it succeeded, return its output."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", module, str(output_dir)],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def tiny_bert(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, hidden: int = 32, layers: int = 1, tied: bool = True
) -> BertForMaskedLM:
    """A `BertForMaskedLM` small enough for a CPU step in a few milliseconds; same seed, same weights.

    ``tied=False`` unties the decoder from the input embeddings (and its bias from ``cls.predictions.bias``):
    accelerate's FSDP2 wrapping places the tied bias in two FSDP groups, which torch 2.13 rejects.
    """
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=SEQ_LEN,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    return BertForMaskedLM(config)


def bert_tokenizer() -> PreTrainedTokenizerBase:
    return train_tokenizer(default_corpus(), "bert", vocab_size=2000)


def mlm_dataset(tokenizer: PreTrainedTokenizerBase, rows: int = 256, mask_every: int = 5) -> Dataset:
    """Real sentences of the embedded corpus, tokenized to `SEQ_LEN`, with a fixed MLM mask.

    Every `mask_every`-th real token (from position 1) is replaced by `[MASK]` and becomes a label,
    so the data, and with `train_sampling_strategy="sequential"` the whole run, is deterministic.
    """
    sentences = [s for doc in default_corpus() for s in split_sentences(doc) if len(s.split()) >= 6][:rows]
    if len(sentences) < rows:
        raise ValueError(f"`rows`: the corpus has only {len(sentences)} usable sentences, asked for {rows}")
    encoded = tokenizer(sentences, max_length=SEQ_LEN, truncation=True, padding="max_length")
    mask_id = tokenizer.mask_token_id
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, attention in zip(encoded["input_ids"], encoded["attention_mask"], strict=True):
        real = sum(attention)
        labels = [IGNORE_INDEX] * SEQ_LEN
        ids = list(ids)
        for position in range(1, real - 1, mask_every):
            labels[position], ids[position] = ids[position], mask_id
        columns["input_ids"].append(ids)
        columns["attention_mask"].append(list(attention))
        columns["labels"].append(labels)
    return Dataset.from_dict(columns)


class NoLabelBatches:
    """Data collator wrapper: the batches with the given indices (0-based, in collation order) get no labels.

    A batch without a single label has a mean MLM loss of 0/0 = NaN while every gradient is a
    finite zero, the "non-finite loss, finite gradients" case.
    """

    def __init__(self, batch_indices: Iterable[int], collator=default_data_collator) -> None:
        self.batch_indices = set(batch_indices)
        self.collator = collator
        self.calls = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        if self.calls in self.batch_indices:
            batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        self.calls += 1
        return batch


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class PoisonGradient(TrainerCallback):
    """Makes one gradient element non-finite during the backward pass of chosen optimizer steps.

    A hook on ``parameter_name`` writes ``value`` (``inf`` or ``nan``) into the first element of that
    parameter's gradient while ``state.global_step`` (steps completed so far) is in ``steps`` and,
    under ``torch.distributed``, only on the processes listed in ``ranks`` (all when ``None``).
    """

    def __init__(
        self,
        steps: Iterable[int],
        value: float = float("inf"),
        parameter_name: str = "bert.embeddings.word_embeddings.weight",
        ranks: Iterable[int] | None = None,
    ) -> None:
        self.steps = set(steps)
        self.value = value
        self.parameter_name = parameter_name
        self.ranks = None if ranks is None else set(ranks)
        self._handle = None

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = self.value
        return grad

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and (self.ranks is None or rank() in self.ranks):
            parameter = dict(model.named_parameters())[self.parameter_name]
            self._handle = parameter.register_hook(self._poison)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class StepSnapshots(TrainerCallback):
    """Copies parameters and optimizer state at the beginning and end of chosen optimizer steps.

    ``before[k]`` / ``after[k]`` hold ``(parameters, optimizer_state)`` around the step that starts
    with ``state.global_step == k``; compare them with :func:`assert_same_state`.
    """

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = set(steps)
        self.before: dict[int, tuple[dict, dict]] = {}
        self.after: dict[int, tuple[dict, dict]] = {}
        self._current: int | None = None

    @staticmethod
    def _capture(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
        parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
        return parameters, copy.deepcopy(optimizer.state_dict()["state"])

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step in self.steps:
            self._current = state.global_step
            self.before[self._current] = self._capture(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._current is not None:
            self.after[self._current] = self._capture(model, optimizer)
            self._current = None


def assert_same_state(first: tuple[dict, dict], second: tuple[dict, dict]) -> None:
    """Parameters and every optimizer state tensor (exp_avg, exp_avg_sq, step) are bit-identical."""
    params_a, optim_a = first
    params_b, optim_b = second
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), f"parameter {name} changed"
    assert optim_a.keys() == optim_b.keys(), "optimizer state gained or lost entries"
    for index in optim_a:
        for key, value in optim_a[index].items():
            other = optim_b[index][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer state {index}.{key} changed"


def changed_parameters(first: tuple[dict, dict], second: tuple[dict, dict]) -> list[str]:
    return [name for name in first[0] if not torch.equal(first[0][name], second[0][name])]


class PoisonActivations(TrainerCallback):
    """Fills a module's forward output with NaN during chosen optimizer steps, on chosen ranks.

    The loss of that process becomes NaN and so do its gradients: the fault starts in the forward
    pass of one rank, as a corrupt batch would.
    """

    def __init__(self, steps: Iterable[int], module_name: str = "bert.embeddings", ranks: Iterable[int] | None = None):
        self.steps = set(steps)
        self.module_name = module_name
        self.ranks = None if ranks is None else set(ranks)
        self._handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and (self.ranks is None or rank() in self.ranks):
            module = dict(model.named_modules())[self.module_name]
            self._handle = module.register_forward_hook(lambda module, inputs, output: output * float("nan"))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def training_args(output_dir, args_class: type | None = None, **overrides: Any):
    """Arguments (`StabilityConfig` unless ``args_class``) for a short deterministic CPU run.

    ``overrides`` replace any field.
    """
    from hf_stability import StabilityConfig

    defaults = dict(
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    defaults.update(overrides)
    return (args_class or StabilityConfig)(str(output_dir), **defaults)


def emulate_fp16_scaler(trainer, init_scale: float = 2.0**10) -> None:
    """Give a CPU ``fp16=True`` trainer a real GradScaler (accelerate creates none on CPU)."""
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.native_amp = True


def offline_wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of an offline W&B run directory, read back with ``wandb leet inspect --json``.

    The CLI is the one installed beside the running interpreter, so this works in a venv that is not
    activated (``make test`` runs ``.venv/bin/python``).
    """
    command = Path(sys.executable).parent / "wandb"
    assert command.exists(), f"the wandb command line is not installed beside {sys.executable}"
    output = subprocess.run(
        [str(command), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, check=True,
        timeout=120,
    ).stdout
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [record["history"]["item"] for record in records if record.get("type") == "history"]


def offline_wandb_records(run_dir: Path, kind: str) -> list[dict]:
    """The records of one type (``summary``, ``alert``) of an offline W&B run directory, read back with
    ``wandb leet inspect --json`` as `wandb sync` would upload them."""
    command = Path(sys.executable).parent / "wandb"
    output = subprocess.run([str(command), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                            text=True, check=True, timeout=120).stdout
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [record[kind] for record in records if record.get("type") == kind]


BART_BASE_TENSORS = 259  # parameter tensors of facebook/bart-base (tied embeddings counted once)


def bart_layout_model(seed: int = 0) -> torch.nn.Module:
    """A `BartForConditionalGeneration` with BART-base's layout (6+6 layers, 259 parameter tensors), tiny widths.

    What a step costs on it beyond the model's own arithmetic is per-tensor Python and op dispatch.
    """
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=128,
        d_model=16,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        max_position_embeddings=64,
    )
    model = BartForConditionalGeneration(config)
    assert len(list(model.parameters())) == BART_BASE_TENSORS
    return model


def seq2seq_dataset(rows: int = 64, length: int = 16, vocab: int = 128, seed: int = 0) -> Dataset:
    """Random token rows with labels for a seq2seq model (what is measured is the step, not the data)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (rows, length), generator=generator)
    labels = torch.randint(4, vocab, (rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
