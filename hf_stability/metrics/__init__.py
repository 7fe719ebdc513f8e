"""`evaluate` metric modules shipped with the package, loadable offline by path.

``evaluate.load(metric_path("masked_token_accuracy"))`` works without the Hub.
"""

from __future__ import annotations

from pathlib import Path


def metric_path(name: str) -> str:
    """Directory of a bundled metric module, for ``evaluate.load``."""
    path = Path(__file__).parent / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"No bundled metric named {name!r}; available: masked_token_accuracy.")
    return str(path)
