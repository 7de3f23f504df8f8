

import datasets
import pytest
from transformers import AutoTokenizer

from moe_lm.data.errors import DataError
from moe_lm.data.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "for i in range(10):\n\tprint(i, end=' ')\n",
]
AWKWARD_TEXTS = [
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "ünïcödé, 日本語, emoji 🙂🚀, combining e\u0301, zero\u200bwidth",
    "punctuation , spacing . like ' this ' and n't",
    "\x00\x01 control bytes \x7f",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(datasets.Dataset.from_dict({"text": CORPUS}), 300, out_dir), out_dir


@pytest.mark.parametrize("text", AWKWARD_TEXTS + CORPUS)
def test_tokenizer_round_trips_text_losslessly(trained, text):
    tokenizer, _ = trained
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokenizer.decode(ids) == text


def test_tokenizer_learns_merges_and_uses_eos_as_pad(trained):
    tokenizer, _ = trained
    ids = tokenizer("    return a + b\n", add_special_tokens=False)["input_ids"]

    assert 256 < len(tokenizer) <= 300
    assert len(ids) < len("    return a + b\n")  # merges learnt from the corpus compress it
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.convert_tokens_to_ids(EOS_TOKEN) == tokenizer.eos_token_id


def test_autotokenizer_loads_the_saved_tokenizer(trained):
    tokenizer, out_dir = trained
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    text = AWKWARD_TEXTS[2] + CORPUS[1]

    assert reloaded(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"]) == text
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.eos_token_id)
    assert load_tokenizer(out_dir).get_vocab() == tokenizer.get_vocab()


def test_tokenizer_training_is_deterministic(trained, tmp_path):
    tokenizer, _ = trained
    again = train_tokenizer(datasets.Dataset.from_dict({"text": CORPUS}), 300, tmp_path)

    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_vocab_must_hold_the_byte_alphabet_and_eos(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=256 is below 257"):
        train_tokenizer(datasets.Dataset.from_dict({"text": CORPUS}), 256, tmp_path)
    assert len(train_tokenizer(datasets.Dataset.from_dict({"text": CORPUS}), 257, tmp_path)) == 257


def test_a_tokenizer_is_never_saved_over_a_folder_holding_files(tmp_path):
    (tmp_path / "NOTES.md").write_text("mine")

    with pytest.raises(DataError, match="is not an empty folder"):
        train_tokenizer(datasets.Dataset.from_dict({"text": CORPUS}), 300, tmp_path)
    assert (tmp_path / "NOTES.md").read_text() == "mine"
