import json
import subprocess
import sys

import pytest

from hf_stability.corpus import default_corpus, split_sentences, train_tokenizer


def test_default_corpus_is_the_pydoc_topics():
    documents = default_corpus()
    assert len(documents) == 79
    assert sum(map(len, documents)) > 300_000
    assert default_corpus() == documents  # fixed order


def test_split_sentences_keeps_every_word():
    text = "The first one. The second one!\n\nA new paragraph? Yes."
    sentences = split_sentences(text)
    assert sentences == ["The first one.", "The second one!", "A new paragraph?", "Yes."]


def test_tokenizer_families_have_their_special_tokens(bert_tokenizer, bart_tokenizer, t5_tokenizer):
    special = {bert_tokenizer.cls_token, bert_tokenizer.sep_token, bert_tokenizer.mask_token}
    assert special == {"[CLS]", "[SEP]", "[MASK]"}
    assert bert_tokenizer("a b").input_ids[0] == bert_tokenizer.cls_token_id
    assert "##" in "".join(bert_tokenizer.get_vocab())
    assert sorted(bert_tokenizer.all_special_tokens) == ["[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UNK]"]
    text = "the interpreter evaluates expressions"
    assert bert_tokenizer.decode(bert_tokenizer(text).input_ids, skip_special_tokens=True) == text
    ids = bart_tokenizer("Hello there.").input_ids
    assert ids[0] == bart_tokenizer.bos_token_id and ids[-1] == bart_tokenizer.eos_token_id
    assert bart_tokenizer.mask_token == "<mask>"
    sentinel_ids = t5_tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert sentinel_ids == list(range(len(t5_tokenizer) - 1, len(t5_tokenizer) - 101, -1))
    assert t5_tokenizer("Hello").input_ids[-1] == t5_tokenizer.eos_token_id


def test_tokenizer_rejects_bad_arguments(corpus):
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(corpus[:2], "gpt")
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer([], "bert")


TRAIN_EACH_KIND = """
import json
from hf_stability.corpus import default_corpus, train_tokenizer
corpus = default_corpus()
print(json.dumps({kind: train_tokenizer(corpus, kind, vocab_size=800).backend_tokenizer.to_str()
                  for kind in ("bert", "bart", "t5")}))
"""


@pytest.mark.slow
def test_training_gives_the_same_tokenizer_in_every_process():
    """The recipes train their tokenizer on the fly, so a seeded run is only reproducible if training is.

    `tokenizers` iterates hash maps whose order is drawn per process: fresh processes are the test.
    """
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", TRAIN_EACH_KIND], capture_output=True, text=True, check=True, timeout=300
            ).stdout
        )
        for _ in range(3)
    ]
    for kind in ("bert", "bart", "t5"):
        vocabularies = [json.loads(run[kind])["model"]["vocab"] for run in runs]
        for vocabulary in vocabularies[1:]:
            assert vocabulary == vocabularies[0], f"{kind}: the vocabulary differs between processes"
        assert len({run[kind] for run in runs}) == 1, f"{kind}: tokenizer.json differs between processes"
