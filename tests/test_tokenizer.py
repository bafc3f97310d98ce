"""Tests for g2rpo_jax/models/tokenizer.py: the char-level tokenizer and the tokenizer.json one."""
import pytest

from g2rpo_jax.models import interface
from g2rpo_jax.models.tokenizer import CHARS, CharTokenizer, HFTokenizer


@pytest.fixture(scope="module")
def tok():
  return CharTokenizer()


def test_char_tokenizer_satisfies_protocol(tok):
  assert isinstance(tok, interface.Tokenizer)


def test_vocab_and_special_ids(tok):
  # 9 specials + 95 printable ASCII + newline + tab.
  assert tok.vocab_size == 106
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
  assert (tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id) == (5, 6, 7, 8)
  assert tok.encode("A") == [9 + ord("A") - 32]


def test_round_trip_on_all_characters(tok):
  text = CHARS + "The answer is 42.\n\tx=(3, 4)"
  ids = tok.encode(text)
  assert len(ids) == len(text)
  assert tok.decode(ids) == text


def test_tags_are_single_tokens_and_round_trip(tok):
  text = "<think>2+2</think><answer>4</answer>"
  ids = tok.encode(text)
  assert ids == [tok.think_id, *tok.encode("2+2"), tok.think_end_id, tok.answer_id,
                 *tok.encode("4"), tok.answer_end_id]
  assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_skips_pad_bos_image(tok):
  ids = [tok.pad_id, tok.bos_id, *tok.encode("ab"), tok.image_id, *tok.encode("c"), tok.eos_id,
         *tok.encode("zz")]
  assert tok.decode(ids) == "abc"
  assert tok.decode(ids, stop_at_eos=False) == "abc<eos>zz"


def test_unknown_characters_become_unk(tok):
  ids = tok.encode("a²b")
  assert ids == [tok.encode("a")[0], tok.unk_id, tok.encode("b")[0]]


def test_decode_rejects_out_of_range_ids(tok):
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_encode_rejects_non_strings(tok):
  with pytest.raises(TypeError, match="expects a str"):
    tok.encode([1, 2])


def _tiny_hf_tokenizer():
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {"<|pad|>": 0, "<|end|>": 1, "<|img|>": 2, "<think>": 3, "hello": 4, "world": 5,
           "[UNK]": 6}
  t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.add_special_tokens(["<|pad|>", "<|end|>", "<|img|>", "<think>"])
  return t


def test_hf_tokenizer_specials_and_decode(tmp_path):
  path = tmp_path / "tokenizer.json"
  _tiny_hf_tokenizer().save(str(path))
  tok = HFTokenizer(path, pad="<|pad|>", eos="<|end|>", image="<|img|>")
  assert isinstance(tok, interface.Tokenizer)
  assert (tok.pad_id, tok.eos_id, tok.image_id, tok.bos_id) == (0, 1, 2, 0)
  assert tok.think_id == 3 and tok.answer_id is None
  assert tok.encode("hello world") == [4, 5]
  # Stops at EOS, drops the image placeholder and pad, keeps the tag (reward parsing needs it).
  assert tok.decode([0, 2, 3, 4, 1, 5]).split() == ["<think>", "hello"]
  assert tok.vocab_size == 7


def test_hf_tokenizer_missing_special_is_an_error():
  with pytest.raises(ValueError, match="'<nope>' is not in the tokenizer's vocabulary"):
    HFTokenizer(_tiny_hf_tokenizer(), pad="<|pad|>", eos="<nope>", image="<|img|>")
