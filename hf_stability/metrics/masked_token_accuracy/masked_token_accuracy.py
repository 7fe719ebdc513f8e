"""Masked-token accuracy and perplexity over the positions that carry a pre-training loss."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy of the predicted token at every position whose reference is not `ignore_index` (-100): the
masked/corrupted positions of BERT MLM, the reconstructed sequence of BART denoising, the target spans
of T5 span corruption. With `token_losses` (the per-position negative log-likelihood, natural log)
it also reports the perplexity exp(mean loss) over the same positions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted token ids, flattened.
    references (`list` of `int`): label ids, flattened and aligned with `predictions`; `ignore_index` = no loss.
    token_losses (`list` of `float`, optional): per-position negative log-likelihood, aligned with `references`.
    ignore_index (`int`, default -100): the label value of positions without loss.
Returns:
    accuracy (`float`), num_tokens (`int`), and perplexity (`float`) when `token_losses` is given.
Example:
    >>> metric = evaluate.load("hf_stability/metrics/masked_token_accuracy")
    >>> metric.compute(predictions=[5, 7, 9], references=[5, -100, 8])
    {'accuracy': 0.5, 'num_tokens': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskedTokenAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, token_losses=None, ignore_index: int = -100) -> dict:
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        scored = references != ignore_index
        count = int(scored.sum())
        if count == 0:
            raise ValueError("`references` holds no position other than `ignore_index`: nothing to score.")
        result = {"accuracy": float((predictions[scored] == references[scored]).mean()), "num_tokens": count}
        if token_losses is not None:
            token_losses = np.asarray(token_losses, dtype=np.float64)
            if token_losses.shape != references.shape:
                raise ValueError(
                    f"`token_losses` must align with `references`: shapes {token_losses.shape} and {references.shape}."
                )
            result["perplexity"] = float(np.exp(token_losses[scored].mean()))
        return result
