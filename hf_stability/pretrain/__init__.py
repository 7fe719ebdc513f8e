"""Shared pre-training recipe code: arguments, data loading and the run skeleton.

The scripts in ``recipes/`` (BERT, BART, T5) each define an :class:`Objective` and call :func:`main`.
"""

from hf_stability.pretrain.arguments import DataArguments, ModelArguments, make_parser, parse_args
from hf_stability.pretrain.data import load_documents, pack_token_streams
from hf_stability.pretrain.errors import InputError
from hf_stability.pretrain.run import RECIPE_DEFAULTS, Objective, main, parse_recipe_args

__all__ = [
    "RECIPE_DEFAULTS",
    "DataArguments",
    "InputError",
    "ModelArguments",
    "Objective",
    "load_documents",
    "main",
    "make_parser",
    "pack_token_streams",
    "parse_args",
    "parse_recipe_args",
]
