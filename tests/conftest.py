"""Shared fixtures: real tokenizers trained on the embedded corpus, offline, once per session."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from hf_stability.corpus import default_corpus, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return default_corpus()


@pytest.fixture(scope="session")
def bert_tokenizer(corpus):
    return train_tokenizer(corpus, "bert", vocab_size=2000)


@pytest.fixture(scope="session")
def bart_tokenizer(corpus):
    return train_tokenizer(corpus, "bart", vocab_size=2000)


@pytest.fixture(scope="session")
def t5_tokenizer(corpus):
    return train_tokenizer(corpus, "t5", vocab_size=2000, num_sentinels=100)
