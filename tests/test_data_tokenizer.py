"""Tokenizer interface: SentencePiece (trained here) and a Hugging Face tokenizer.json, same special tokens."""

import json
import pickle

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import models, pre_tokenizers

from bagel_jax.data.tokenizer import (
    SPECIAL_TOKENS,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

TEXTS = [
    "a red circle at the top left",
    "two blue squares and a green triangle",
    "how many circles are there",
    "make the circle blue",
    "the yellow square moves right",
] * 20


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("sp") / "m.model"), vocab_size=512)


def test_sentencepiece_training_is_deterministic_and_fits_vocab(sp, tmp_path):
    assert isinstance(sp, SentencePieceTokenizer)
    assert sp.vocab_size <= 512 and sp.num_added_tokens == 0
    assert sorted(sp.special.values()) == [2, 3, 4, 5]  # user-defined symbols right after <pad>=0, <unk>=1
    again = train_sentencepiece(TEXTS, sp.path, vocab_size=512)
    assert again.encode("the red square") == sp.encode("the red square")
    with open(sp.path, "rb") as f:
        first = f.read()
    train_sentencepiece(TEXTS, sp.path, vocab_size=512)
    with open(sp.path, "rb") as f:
        assert f.read() == first
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_sentencepiece(["", "  "], str(tmp_path / "x.model"))


def test_sentencepiece_encode_decode_and_specials(sp):
    text = "a red circle at the top left"
    ids = sp.encode(text)
    assert ids and sp.decode(ids) == text
    wrapped = sp.encode("<|im_start|>" + text + "<|im_end|>")
    assert wrapped == [sp.bos_id] + ids + [sp.eos_id]
    assert sp.decode(wrapped) == "<|im_start|>" + text + "<|im_end|>"
    assert sp.special_token_ids() == dict(
        bos_token_id=sp.bos_id, eos_token_id=sp.eos_id, start_of_image=sp.vision_start_id, end_of_image=sp.vision_end_id
    )
    clone = pickle.loads(pickle.dumps(sp))
    assert clone.encode(text) == ids and clone.special == sp.special


def _word_level(path, vocab):
    tok = HFTok(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_appends_missing_specials(tmp_path):
    vocab = {"[UNK]": 0, "a": 1, "red": 2, "circle": 3}
    tok = load_tokenizer(_word_level(tmp_path / "tokenizer.json", vocab))
    assert isinstance(tok, HFTokenizer)
    assert tok.num_added_tokens == 4 and tok.vocab_size == 8
    assert [tok.special[t] for t in SPECIAL_TOKENS] == [4, 5, 6, 7]  # appended in the reference's order
    assert tok.encode("a red circle") == [1, 2, 3]
    assert tok.encode("<|im_start|>a red<|vision_start|><|vision_end|>") == [4, 1, 2, 6, 7]
    assert tok.decode([4, 1, 2, 5]) == "<|im_start|>a red<|im_end|>"
    assert pickle.loads(pickle.dumps(tok)).encode("red circle") == [2, 3]
    assert load_tokenizer(str(tmp_path)).vocab_size == 8  # a directory holding tokenizer.json


def test_hf_tokenizer_uses_existing_special_ids(tmp_path):
    # Qwen2.5 has the four tokens as added tokens; their ids are kept (151644.. in the real vocabulary)
    vocab = {"[UNK]": 0, "a": 1, "red": 2}
    path = _word_level(tmp_path / "tokenizer.json", vocab)
    tok = HFTok.from_file(path)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(path)
    loaded = load_tokenizer(path)
    assert loaded.num_added_tokens == 0
    assert [loaded.special[t] for t in SPECIAL_TOKENS] == [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert loaded.encode("<|im_start|>a red<|im_end|>") == [loaded.bos_id, 1, 2, loaded.eos_id]
    assert json.loads(open(path).read())["added_tokens"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "vocab.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match="expected a SentencePiece '.model' or a 'tokenizer.json'"):
        load_tokenizer(str(bad))
