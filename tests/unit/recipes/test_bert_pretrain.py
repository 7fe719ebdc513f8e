"""The BERT recipe's rows are `nsp_dataset`'s: one NSP implementation, one seed scheme."""

from __future__ import annotations

from datasets import Dataset

from hf_stability.nsp_examples import nsp_dataset
from hf_stability.pretrain import DataArguments
from hf_stability.pretrain.data import map_documents
from tests.integration.recipes.recipe_utils import load_recipe


def test_bert_recipe_rows_are_nsp_dataset_examples(bert_tokenizer, corpus):
    bert = load_recipe("bert")
    data_args = DataArguments(max_seq_length=64)
    objective_args = bert.BertPretrainingArguments(short_seq_prob=0.2, nsp_probability=0.4)
    documents = Dataset.from_dict({"text": corpus[:40]})
    rows = map_documents(documents, bert.make_rows(bert_tokenizer, data_args, objective_args, 3), data_args, "rows")
    expected = nsp_dataset(
        documents, bert_tokenizer, max_seq_length=64, short_seq_prob=0.2, nsp_probability=0.4, seed=3
    )
    assert len(rows) == len(expected) > 0
    for column in ("input_ids", "token_type_ids", "next_sentence_label"):
        assert rows[column] == expected[column], column
