"""Task gallery: `python -m experiments.show_tasks --out=DIR [--n=8] [--split=train] [--scale=6]`.

Writes DIR/<task>.png for every task: a row of examples, each image upscaled with nearest
neighbour so the 32×32 pixels stay visible, with the prompt, the demonstration and its
reward / format scores written under it. Knobs: `--difficulty=task.knob=value,...`
(e.g. `--difficulty=ocr.length=5,counting.max_count=6`) and `--image_size`.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import textwrap

from PIL import Image, ImageDraw

from g2rpo_jax import tasks
from g2rpo_jax.tasks import render

_WRAP = 26  # characters per caption line


def parse_difficulty(spec: str) -> dict[str, dict]:
  """'ocr.length=5,counting.max_count=6' -> {'ocr': {'length': 5}, 'counting': {...}}."""
  out: dict[str, dict] = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, sep, value = item.partition("=")
    task, dot, knob = key.partition(".")
    if not sep or not dot:
      raise ValueError(f"--difficulty item {item!r}: expected task.knob=value")
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value  # a bare string such as ops=+*
    out.setdefault(task, {})[knob] = parsed
  return out


def task_grid(task, split: str, n: int, scale: int, difficulty: dict | None = None) -> Image.Image:
  """A PIL image: `n` examples of `task` side by side with captions."""
  examples = [task.example(split, i, **(difficulty or {})) for i in range(n)]
  side = task.image_size * scale
  font = render.font(13)
  captions = []
  for ex in examples:
    demo = task.demonstration(ex)
    lines = textwrap.wrap(ex.prompt, _WRAP) + [""] + textwrap.wrap(demo, _WRAP, break_on_hyphens=False)
    lines += ["", f"reward {task.reward(demo, ex):.2f}  format {task.format_reward(demo):.0f}"]
    captions.append(lines)
  line_h = 16
  cap_h = line_h * max(len(c) for c in captions) + 8
  title_h = 24
  pad = 8
  width = n * (side + pad) + pad
  sheet = Image.new("RGB", (max(width, 300), title_h + side + cap_h + pad), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  draw.text((pad, 4), f"{task.name}  ({task.reward_type}, {task.role}, {split}, "
                      f"difficulty {examples[0].difficulty})", fill=(0, 0, 0), font=render.font(15))
  for k, (ex, lines) in enumerate(zip(examples, captions)):
    x = pad + k * (side + pad)
    img = Image.fromarray(ex.image).resize((side, side), Image.NEAREST)
    sheet.paste(img, (x, title_h))
    draw.rectangle([(x - 1, title_h - 1), (x + side, title_h + side)], outline=(180, 180, 180))
    for j, line in enumerate(lines):
      draw.text((x, title_h + side + 4 + j * line_h), line, fill=(0, 0, 0), font=font)
  return sheet


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.show_tasks", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="directory for the PNGs (created if missing)")
  parser.add_argument("--n", type=int, default=8, help="examples per task")
  parser.add_argument("--split", default="train", choices=tasks.SPLITS)
  parser.add_argument("--scale", type=int, default=6, help="nearest-neighbour upscaling factor")
  parser.add_argument("--image_size", type=int, default=tasks.DEFAULT_IMAGE_SIZE)
  parser.add_argument("--tasks", default=",".join(tasks.TASK_NAMES), help="comma-separated names")
  parser.add_argument("--difficulty", default="", help="task.knob=value,... overrides")
  args = parser.parse_args(argv)
  difficulty = parse_difficulty(args.difficulty)
  os.makedirs(args.out, exist_ok=True)
  for name in filter(None, args.tasks.split(",")):
    task = tasks.get_task(name, args.image_size)
    path = os.path.join(args.out, f"{name}.png")
    task_grid(task, args.split, args.n, args.scale, difficulty.get(name)).save(path)
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
