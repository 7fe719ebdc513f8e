"""Imports of optional dependencies, failing with the ``pip install`` line of the extra that provides them.

The core (trainer, callbacks, collators) needs only what ``pip install hf-stability`` installs; the
few functions that need more import it through :func:`require` when called.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        raise ImportError(
            f"{feature} needs `{module.split('.')[0]}`, which is not installed: pip install 'hf-stability[{extra}]'"
        ) from error
