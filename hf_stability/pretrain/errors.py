"""Bad input found before training, and how the recipes report it: one line, no traceback."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

Function = TypeVar("Function", bound=Callable[..., Any])


class InputError(ValueError):
    """An argument, ``--config`` file or data file that cannot work, found before any training step.

    A ``ValueError``, so library callers catch it as the SPEC says; the recipes print its message as one
    line (``<recipe>: error: …``) and exit 2, as `argparse` does, because a traceback only hides the cause.
    """


@contextlib.contextmanager
def input_errors() -> Iterator[None]:
    """Turn the ``ValueError``/``TypeError`` a validating constructor raises (a config dataclass, a collator
    checking the objective's flags) into an `InputError`; an `InputError` passes through unchanged."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError) as error:
        raise InputError(str(error)) from error


def exit_on_input_error(function: Function) -> Function:
    """Run ``function``; on `InputError`, print its message as one line to stderr and exit with status 2."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except InputError as error:
            print(f"{_program()}: error: {' '.join(str(error).split())}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


def _program() -> str:
    return sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "hf-stability"
