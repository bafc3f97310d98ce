"""Chart reading: a small bar chart → the value of the bar of a named colour.

Reward = mean relative accuracy over thresholds 0.50:0.05:0.95 (SPEC §6), so an answer off by one
on a bar of 8 still earns most of the credit and a wild guess earns none. The chart has a y axis
with a tick per unit and light grid lines every two units; a bar of value v is v units tall, so
the value is read by counting ticks (no text: labels would not survive 32×32).

Must not import jax, TFDS or the trainer.
"""
from __future__ import annotations

from PIL import ImageDraw

from g2rpo_jax.tasks import base, render

_AXIS = (60, 60, 60)
_GRID = (215, 215, 215)


class Chart(base.Task):
  """'Value of the green bar?' -> an integer; reward = mean relative accuracy (SPEC §6).

  Knobs: n_bars (2..6, distinct colours; default 3), max_value (values are uniform in
  1..max_value; default 8; the unit height shrinks as it grows).
  """
  name = "chart"
  reward_type = "relative"
  role = "hybrid"
  default_difficulty = {"n_bars": 3, "max_value": 8}

  def _check_difficulty(self, d):
    base.check_int_knob(self.name, d, "n_bars", 1, len(render.COLORS))
    base.check_int_knob(self.name, d, "max_value", 1, 99)
    if self._unit(d["max_value"]) < 1:
      raise ValueError(f"task {self.name!r}: max_value={d['max_value']} leaves less than one pixel "
                       f"per unit at image_size {self.image_size}; lower it or raise image_size")

  def _unit(self, max_value: int) -> int:
    return (self.image_size - 6) // max_value

  def _generate(self, rng, split, d):
    del split
    size, n = self.image_size, d["n_bars"]
    names = list(render.COLORS)
    colors = [names[i] for i in rng.permutation(len(names))[:n]]
    values = [int(v) for v in rng.integers(1, d["max_value"] + 1, size=n)]
    asked = int(rng.integers(n))
    unit = self._unit(d["max_value"])
    base_y, axis_x = size - 3, 3  # baseline row and y-axis column
    img = render.canvas(size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for v in range(2, d["max_value"] + 1, 2):
      draw.line([(axis_x + 1, base_y - v * unit), (size - 1, base_y - v * unit)], fill=_GRID)
    slot = (size - axis_x - 2) // n
    width = max(1, slot - max(1, slot // 4))
    for k, (c, v) in enumerate(zip(colors, values)):
      x0 = axis_x + 2 + k * slot
      draw.rectangle([(x0, base_y - v * unit), (x0 + width - 1, base_y - 1)],
                     fill=render.COLORS[c])
    draw.line([(axis_x, 0), (axis_x, base_y)], fill=_AXIS)
    draw.line([(axis_x, base_y), (size - 1, base_y)], fill=_AXIS)
    for v in range(1, d["max_value"] + 1):
      draw.point((axis_x - 1, base_y - v * unit), fill=_AXIS)
      if v % 2 == 0:
        draw.point((axis_x - 2, base_y - v * unit), fill=_AXIS)
    prompt = f"Value of the {colors[asked]} bar?"
    return render.to_array(img), prompt, values[asked], {"color": colors[asked]}

  def _think_answer(self, example):
    return f"{example.meta['color']} bar {example.answer} ticks", str(example.answer)
