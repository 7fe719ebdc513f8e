"""Unit tests run no `Trainer` and launch no process; a test that needs either belongs in ``tests/integration``.

Enforced here, so the split stays true: `Trainer.train` and `subprocess.Popen` fail inside a unit test.
"""

from __future__ import annotations

import subprocess

import pytest
from transformers import Trainer


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"a unit test may not {what}; move the test to tests/integration")

    return refused


@pytest.fixture(autouse=True)
def no_trainer_run_or_process(monkeypatch):
    monkeypatch.setattr(Trainer, "train", _refuse("run a Trainer"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("launch a process"))
