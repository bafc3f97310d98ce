"""Compare the JAX Qwen2.5-VL port with transformers on a checkpoint on disk.

  python -m experiments.check_parity --hf_dir=/path/to/Qwen2.5-VL-3B-Instruct
  python -m experiments.check_parity --make_tiny=/tmp/tiny_qwen   # write + check a tiny random one

Runs three prompts (text only, one image, two images of different sizes; synthetic images
unless --image is given) through both implementations in f32 and prints, as its last two lines,
  max_abs_logit_diff=<max |logit difference| over every real prompt position>
  greedy_match=<true|false>   (--max_new_tokens greedy tokens per prompt identical)
Our side runs the model's own prefill/decode KV-cache path under jit. Needs the `hf` extra
(torch==2.13.0, transformers). Exit status 0 iff logits are within --tol and greedy matches.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _load_images(paths):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.check_parity", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf_dir", default="", help="HF Qwen2.5-VL checkpoint directory")
  parser.add_argument("--make_tiny", default="", help="write a tiny random checkpoint here and check it")
  parser.add_argument("--image", action="append", default=[], help="image file(s) (default: synthetic)")
  parser.add_argument("--max_new_tokens", type=int, default=16)
  parser.add_argument("--min_pixels", type=int, default=28 * 28 * 4)
  parser.add_argument("--max_pixels", type=int, default=28 * 28 * 64)
  parser.add_argument("--tol", type=float, default=1e-4)
  args = parser.parse_args(argv)
  if bool(args.hf_dir) == bool(args.make_tiny):
    parser.error("give exactly one of --hf_dir and --make_tiny")

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import Qwen2_5_VLForConditionalGeneration  # pylint: disable=g-import-not-at-top

  from g2rpo_jax.models import interface, qwen25vl  # pylint: disable=g-import-not-at-top
  from g2rpo_jax.models import qwen25vl_testing as qt  # pylint: disable=g-import-not-at-top
  from g2rpo_jax.models.qwen25vl_loading import load_qwen25vl  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_default_matmul_precision", "highest")  # f32 matmuls on every backend
  hf_dir = args.hf_dir or args.make_tiny
  if args.make_tiny:
    qt.write_tiny_checkpoint(args.make_tiny)
    print(f"wrote a tiny random Qwen2.5-VL checkpoint to {args.make_tiny}")

  model = load_qwen25vl(hf_dir, dtype="float32", param_dtype="float32")
  cfg = model.config
  proc = qwen25vl.build_processor(dict(
      name="qwen25vl", checkpoint_dir=hf_dir, max_prompt_len=4096, max_images=2,
      min_pixels=args.min_pixels, max_pixels=args.max_pixels))
  rng = np.random.default_rng(0)
  images = _load_images(args.image) if args.image else [qt.random_image(rng, 180, 120),
                                                        qt.random_image(rng, 90, 260)]
  second = images[1] if len(images) > 1 else images[0]
  prompts = ["Write one sentence about the sea.", "Describe this image.",
             "<image> Compare the first picture with the second: <image>"]
  prompt_images = [None, images[0], [images[0], second]]
  encoded = [proc.encode_one(p, im)[0] for p, im in zip(prompts, prompt_images)]
  proc.max_prompt_len = max(len(e) for e in encoded)
  batch = proc(prompts, prompt_images)
  device_batch = interface.PromptBatch(
      tokens=jnp.asarray(batch.tokens), mask=jnp.asarray(batch.mask),
      vision=jax.tree.map(jnp.asarray, batch.vision))

  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
  graphdef, params = interface.split_model(model)
  steps = args.max_new_tokens

  @jax.jit
  def ours(params, prompt):
    m = interface.merge_model(graphdef, params)
    logits = m.logits(m.hidden_states(prompt, jnp.zeros((prompt.tokens.shape[0], 0), jnp.int32)))
    first, cache = m.prefill(prompt, prompt.tokens.shape[1] + steps)

    def step(carry, _):
      last, cache = carry
      tok = jnp.argmax(last, axis=-1).astype(jnp.int32)
      last, cache = m.decode(tok, cache)
      return (last, cache), tok

    _, toks = jax.lax.scan(step, (first, cache), None, length=steps)
    return logits, toks.T

  logits, tokens = jax.device_get(ours(params, device_batch))
  max_diff, match = 0.0, True
  for r, prompt in enumerate(prompts):
    inputs = qt.reference_inputs(batch, r, proc.tokenizer.image_id, cfg.image_mean, cfg.image_std,
                                 cfg.vision.patch_dim)
    with torch.no_grad():
      theirs = ref(**inputs).logits[0].float().numpy()
      generated = ref.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                               pad_token_id=proc.tokenizer.pad_id)
    theirs_tokens = generated[0, inputs["input_ids"].shape[1]:].numpy()
    diff = float(np.abs(logits[r][batch.mask[r]] - theirs).max())
    same = theirs_tokens.tolist() == tokens[r].tolist()
    max_diff, match = max(max_diff, diff), match and same
    print(f"prompt {r} ({int(batch.mask[r].sum())} tokens, "
          f"{int((np.asarray(batch.vision['patch_valid'][r]).sum(-1) > 0).sum())} images): "
          f"max|dlogit|={diff:.3g} (logit scale {np.abs(theirs).max():.3g}) greedy_same={same}")
    if not same:
      print(f"  ours:   {tokens[r].tolist()}\n  theirs: {theirs_tokens.tolist()}")
  print(f"max_abs_logit_diff={max_diff:.6g}")
  print(f"greedy_match={'true' if match else 'false'}")
  return 0 if (max_diff <= args.tol and match) else 1


if __name__ == "__main__":
  sys.exit(main())
