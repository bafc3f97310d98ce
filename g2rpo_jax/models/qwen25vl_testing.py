"""Tiny random Qwen2.5-VL checkpoints and tokenizers, written offline with `transformers`.

For tests and for trying `experiments/check_parity.py` without downloading anything:
`write_tiny_checkpoint(dir)` saves config.json + safetensors (optionally sharded, with
model.safetensors.index.json) + tokenizer.json of a 2-layer model with a 2-block vision tower
(one window-attention block, one full-attention block). Every tensor is random (norm scales and
biases too), so a mis-loaded tensor shows up in the logits.

`reference_processor(dir)` is transformers' own Qwen2.5-VL processor over the same tokenizer,
with `CHAT_TEMPLATE` (a Jinja template written here that renders Qwen's ChatML for messages of
text and images) and the PIL image processor, for checking our processing id-for-id.

Imports torch and transformers lazily (the `hf` / `test` extras); must not be imported by the
library's training path.
"""
from __future__ import annotations

import json
import os

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Renders messages [{"role", "content": str | [{"type": "image"} | {"type": "text", "text"}]}]
# as ChatML; a default system turn is added when the first message is not a system message.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['content'] is string -%}{{- m['content'] -}}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")

_CORPUS = [
    "You are a helpful assistant.", "Describe the image.", "How many circles are there?",
    "What is the value of x in the chart? Answer with a number.", "Read the text in the image.",
    "<think> The answer is 42 because the bars add up. </think> <answer> 42 </answer>",
    "Find the red box and give its coordinates [10, 20, 30, 40].", "system user assistant",
]


def build_tokenizer(vocab_size: int = 320):
  """A byte-level BPE `tokenizers.Tokenizer` trained on a few sentences + Qwen's specials."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
  return tok


def tiny_hf_config(*, tie: bool = False, vocab_size: int = 384, window_size: int = 56):
  """transformers' Qwen2_5_VLConfig for the tiny model (ids of the specials from the tokenizer)."""
  from transformers import Qwen2_5_VLConfig
  tok = build_tokenizer()
  ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
  return Qwen2_5_VLConfig(
      text_config=dict(
          vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
          max_position_embeddings=1024, eos_token_id=ids["<|im_end|>"],
          pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                           "mrope_section": [2, 3, 3]}),
      vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                         out_hidden_size=64, window_size=window_size, fullatt_block_indexes=[1]),
      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
      tie_word_embeddings=tie)


def write_tiny_checkpoint(path: str, *, tie: bool = False, max_shard_size: str | None = None,
                          seed: int = 0):
  """Saves a random tiny Qwen2.5-VL (f32) + tokenizer.json to `path`; returns the torch model.

  `max_shard_size` (e.g. "60KB") splits the weights into several files with an index.
  """
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  os.makedirs(path, exist_ok=True)
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(tie=tie)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        p.copy_(1.0 + 0.2 * r)
      elif name.endswith(".bias"):
        p.copy_(0.2 * r)
      elif "embed_tokens" in name:
        p.copy_(r)
      else:
        p.copy_(r * p.shape[-1] ** -0.5 * (2.0 if p.dim() > 2 else 1.0))
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  build_tokenizer().save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
    json.dump({"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 16, "patch_size": 14,
               "merge_size": 2, "temporal_patch_size": 2,
               "image_processor_type": "Qwen2VLImageProcessor"}, f)
  return model


def reference_processor(path: str, *, min_pixels: int, max_pixels: int):
  """transformers' Qwen2_5_VLProcessor over `path`/tokenizer.json with the PIL image processor."""
  from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"),
                                pad_token="<|endoftext|>", eos_token="<|im_end|>")
  image_proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)

  class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    # Without a video processor argument: transformers' video processor needs torchvision,
    # which the test extra does not install, and images never touch it.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
      super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

  return ImageOnlyProcessor(image_processor=image_proc, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A smooth-ish random uint8[H, W, 3] image (noise on a gradient, so resizing matters)."""
  yy, xx = np.mgrid[0:height, 0:width]
  base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                   (xx + yy) * 127 / max(height + width - 2, 1)], axis=-1)
  noise = rng.normal(0, 40, size=(height, width, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def reference_inputs(batch, row: int, image_id: int, image_mean, image_std, patch_dim: int = 1176):
  """Row `row` of our (left-padded, numpy) PromptBatch as unpadded transformers inputs.

  Pixels are normalised the reference's way ((x/255 - mean)/std per channel of the
  channel-major patch layout); the grids are recovered from the patches' (row, col) positions.
  """
  import torch
  m = batch.mask[row]
  ids = torch.tensor(np.asarray(batch.tokens[row])[m], dtype=torch.long)[None]
  valid = np.asarray(batch.vision["patch_valid"][row]).sum(-1)
  if not valid.any():
    return dict(input_ids=ids)
  per_channel = patch_dim // 3
  mean = np.repeat(np.asarray(image_mean, np.float32), per_channel)
  std = np.repeat(np.asarray(image_std, np.float32), per_channel)
  pix, grids = [], []
  for k in np.nonzero(valid)[0]:
    u8 = np.asarray(batch.vision["pixels"][row, k, :valid[k]]).astype(np.float32)
    pos = np.asarray(batch.vision["patch_pos"][row, k, :valid[k]])
    gh, gw = pos[:, 0].max() + 1, pos[:, 1].max() + 1
    # Our patches are in window order; the reference takes them merge-unit-major (its own
    # window permutation happens inside the vision tower).
    r_, c_ = pos[:, 0], pos[:, 1]
    key = ((r_ // 2) * (gw // 2) + c_ // 2) * 4 + (r_ % 2) * 2 + c_ % 2
    pix.append(((u8 / 255.0 - mean) / std)[np.argsort(key)])
    grids.append([1, gh, gw])
  return dict(input_ids=ids, pixel_values=torch.tensor(np.concatenate(pix)),
              image_grid_thw=torch.tensor(np.asarray(grids)),
              mm_token_type_ids=(ids == image_id).long())
