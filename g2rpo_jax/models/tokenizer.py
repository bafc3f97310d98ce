"""Tokenizers implementing `interface.Tokenizer`: a character-level one and a tokenizer.json one.

`CharTokenizer` is the built-in default: one id per printable ASCII character (plus newline and
tab), and single tokens for the specials and the reasoning / answer tags. `HFTokenizer` wraps a
Hugging Face `tokenizers` tokenizer.json with the special-token strings given by the caller.

Must not import jax, the models or the trainer: tokenisation is host-side string work.
"""
from __future__ import annotations

import re
from typing import Sequence

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<bos>", "<eos>", "<image>", "<unk>"
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
SPECIALS = (PAD, BOS, EOS, IMAGE, UNK, THINK, THINK_END, ANSWER, ANSWER_END)
# Characters with their own id: printable ASCII (space..tilde), newline and tab.
CHARS = "".join(chr(c) for c in range(32, 127)) + "\n\t"


class CharTokenizer:
  """Character-level tokenizer. Ids: the 9 `SPECIALS` (pad=0, bos=1, eos=2, image=3, unk=4,
  <think>=5, </think>=6, <answer>=7, </answer>=8), then `CHARS` in order; vocab_size 106.

  encode: the literal special strings become their ids; any other character outside `CHARS`
  becomes <unk> (so encode/decode round-trips exactly only on `CHARS` text).
  decode: stops at the first EOS (if `stop_at_eos`), drops PAD / BOS / image placeholders,
  renders the tags and <unk> as their strings.
  """

  def __init__(self):
    self._itos = list(SPECIALS) + list(CHARS)
    self._stoi = {s: i for i, s in enumerate(self._itos)}
    self._special_re = re.compile("|".join(re.escape(s) for s in SPECIALS))
    self._skip = {self.pad_id, self.bos_id, self.image_id}

  vocab_size = property(lambda self: len(self._itos))
  pad_id = property(lambda self: self._stoi[PAD])
  bos_id = property(lambda self: self._stoi[BOS])
  eos_id = property(lambda self: self._stoi[EOS])
  image_id = property(lambda self: self._stoi[IMAGE])
  unk_id = property(lambda self: self._stoi[UNK])
  think_id = property(lambda self: self._stoi[THINK])
  think_end_id = property(lambda self: self._stoi[THINK_END])
  answer_id = property(lambda self: self._stoi[ANSWER])
  answer_end_id = property(lambda self: self._stoi[ANSWER_END])

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids, pos = [], 0
    for m in self._special_re.finditer(text):
      ids += [self._stoi.get(c, self.unk_id) for c in text[pos:m.start()]]
      ids.append(self._stoi[m.group()])
      pos = m.end()
    ids += [self._stoi.get(c, self.unk_id) for c in text[pos:]]
    return ids

  def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if stop_at_eos and i == self.eos_id:
        break
      if i in self._skip:
        continue
      if not 0 <= i < len(self._itos):
        raise ValueError(f"token id {i} outside the vocabulary [0, {len(self._itos)})")
      out.append(self._itos[i])
    return "".join(out)


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json behind `interface.Tokenizer`.

  The special-token strings are model-specific, so they are arguments (Qwen2.5-VL e.g.:
  pad="<|endoftext|>", eos="<|im_end|>", image="<|image_pad|>", bos=None). Missing BOS falls
  back to PAD's id (a model without BOS never emits it). A tag that is not a single token of the
  vocabulary gets id None.
  """

  def __init__(self, path_or_tokenizer, *, pad: str, eos: str, image: str, bos: str | None = None,
               think: str = THINK, think_end: str = THINK_END, answer: str = ANSWER,
               answer_end: str = ANSWER_END):
    import tokenizers  # pylint: disable=g-import-not-at-top
    if isinstance(path_or_tokenizer, tokenizers.Tokenizer):
      self._tok = path_or_tokenizer
    else:
      self._tok = tokenizers.Tokenizer.from_file(str(path_or_tokenizer))

    def need(s):
      i = self._tok.token_to_id(s)
      if i is None:
        raise ValueError(f"special token {s!r} is not in the tokenizer's vocabulary")
      return i

    self._pad, self._eos, self._image = need(pad), need(eos), need(image)
    self._bos = need(bos) if bos is not None else self._pad
    self._tags = [self._tok.token_to_id(s) for s in (think, think_end, answer, answer_end)]
    self._skip = {self._pad, self._bos, self._image}

  vocab_size = property(lambda self: self._tok.get_vocab_size(with_added_tokens=True))
  pad_id = property(lambda self: self._pad)
  bos_id = property(lambda self: self._bos)
  eos_id = property(lambda self: self._eos)
  image_id = property(lambda self: self._image)
  think_id = property(lambda self: self._tags[0])
  think_end_id = property(lambda self: self._tags[1])
  answer_id = property(lambda self: self._tags[2])
  answer_end_id = property(lambda self: self._tags[3])

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
    kept = []
    for i in ids:
      i = int(i)
      if stop_at_eos and i == self._eos:
        break
      if i not in self._skip:
        kept.append(i)
    # skip_special_tokens=False: the tags may be registered as specials but are content here.
    return self._tok.decode(kept, skip_special_tokens=False)
