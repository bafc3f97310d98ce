"""Response parsing and the four accuracy rewards on hand-made cases (values computed by hand)."""
import math

import pytest

from g2rpo_jax.tasks import parsing, rewards


def resp(answer: str, think: str = "x") -> str:
  return f"<think>{think}</think><answer>{answer}</answer>"


# --- format ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "<think>a</think><answer>b</answer>",
    "  <think></think>\n<answer></answer>\n",
    "<think>1,2,3</think> <answer>3</answer>",
])
def test_format_accepts_the_shape(text):
  assert parsing.format_reward(text) == 1.0


@pytest.mark.parametrize("text", [
    "", "hello", "<answer>3</answer>", "<think>a</think>",
    "<think>a<answer>b</answer>",                         # think never closed
    "<think>a</think><answer>b</answr>",                  # mangled closing tag
    "<think>a</think><answer>b</answer> trailing",        # text after the answer
    "lead <think>a</think><answer>b</answer>",            # text before the think
    "<think>a</think>x<answer>b</answer>",                # text between the blocks
    "<think>a<think>b</think><answer>c</answer>",         # nested think
    "<think>a</think><answer>b<answer>c</answer>",        # nested answer
    "<think>a</think><answer>b</answer><answer>c</answer>",
    "<answer>b</answer><think>a</think>",                 # wrong order
    None, 3, b"<think>a</think><answer>b</answer>", ["<think>"],
    "<think>" + "a" * (parsing.MAX_RESPONSE_CHARS + 1) + "</think><answer>b</answer>",
])
def test_format_rejects_everything_else(text):
  assert parsing.format_reward(text) == 0.0


def test_extract_answer():
  assert parsing.extract_answer(resp(" 7 ")) == " 7 "
  assert parsing.extract_answer("no think <answer>4</answer> tail") == "4"
  assert parsing.extract_answer("<answer>4") is None
  assert parsing.extract_answer("<answer>" + "9" * (parsing.MAX_ANSWER_CHARS + 1) + "</answer>") is None
  assert parsing.extract_answer("<answer>1<answer>2</answer>") is None
  assert parsing.extract_answer(None) is None


@pytest.mark.parametrize("text,value", [
    ("7", 7.0), (" -3 ", -3.0), ("2.50", 2.5), ("4.", 4.0), (".5", 0.5), ("+1", 1.0), ("12.", 12.0),
])
def test_parse_number(text, value):
  assert parsing.parse_number(text) == value


@pytest.mark.parametrize("text", ["", "seven", "3 4", "1e999", "nan", "inf", "3,5", "--1", "٣"])
def test_parse_number_rejects(text):
  assert parsing.parse_number(text) is None


def test_parse_box():
  assert parsing.parse_box("1,2,3,4") == (1.0, 2.0, 3.0, 4.0)
  assert parsing.parse_box("[1, 2.5, 3 ,4]") == (1.0, 2.5, 3.0, 4.0)
  assert parsing.parse_box("(0,0,10,10)") == (0.0, 0.0, 10.0, 10.0)
  for bad in ["1,2,3", "1,2,3,4,5", "a,b,c,d", "[1 2 3 4]", "", "[1,2,3,4", "(1,2,3,4]"]:
    assert parsing.parse_box(bad) is None, bad


# --- binary ---------------------------------------------------------------------------------------

def test_binary_numbers():
  acc = lambda a, t: rewards.accuracy("binary", resp(a), t)
  assert acc("3", 3) == 1.0
  assert acc(" 3.0 ", 3) == 1.0
  assert acc("4", 3) == 0.0
  assert acc("3 apples", 3) == 0.0
  assert acc("17", "17") == 1.0  # a numeric string truth compares numerically
  assert acc("-2", -2) == 1.0


def test_binary_text():
  acc = lambda a, t: rewards.accuracy("binary", resp(a), t)
  assert acc("Left", "left") == 1.0
  assert acc(" left. ", "left") == 1.0
  assert acc("right", "left") == 0.0
  assert acc("leftright", "left") == 0.0


# --- iou ------------------------------------------------------------------------------------------

def test_iou_values():
  acc = lambda a, t: rewards.accuracy("iou", resp(a), t)
  assert acc("0,0,10,10", [0, 0, 10, 10]) == 1.0
  # Half overlap: inter 50, union 150 -> 1/3.
  assert acc("5,0,15,10", [0, 0, 10, 10]) == pytest.approx(1 / 3)
  # Inside: 4x4 box in a 8x8 box -> 16 / 64.
  assert acc("[2,2,6,6]", [0, 0, 8, 8]) == pytest.approx(0.25)
  assert acc("20,20,30,30", [0, 0, 10, 10]) == 0.0
  assert acc("10,10,0,0", [0, 0, 10, 10]) == 0.0  # inverted box is degenerate
  assert acc("3,3,3,9", [0, 0, 10, 10]) == 0.0  # zero width
  assert acc("0,0,10", [0, 0, 10, 10]) == 0.0


def test_box_iou_is_symmetric():
  a, b = (1, 2, 7, 9), (3, 0, 12, 5)
  # inter: x 3..7 (4), y 2..5 (3) = 12; areas 42 and 45 -> 12 / 75.
  assert rewards.box_iou(a, b) == rewards.box_iou(b, a) == pytest.approx(12 / 75)


# --- ocr ------------------------------------------------------------------------------------------

def test_edit_distance():
  assert rewards.edit_distance("kitten", "sitting") == 3
  assert rewards.edit_distance("", "abc") == 3
  assert rewards.edit_distance("abc", "abc") == 0
  assert rewards.edit_distance("ab", "ba") == 2


def test_ocr_values():
  acc = lambda a, t: rewards.accuracy("ocr", resp(a), t)
  assert acc("K7QA", "K7QA") == 1.0
  assert acc("k7qa", "K7QA") == 1.0  # case-insensitive
  assert acc("K7QB", "K7QA") == pytest.approx(0.75)  # one substitution of four
  assert acc("K7", "K7QA") == pytest.approx(0.5)  # two deletions
  assert acc("K7QAXYZW", "K7QA") == 0.0  # four insertions: clipped at 0
  assert acc("", "K7QA") == 0.0
  assert acc("hello  world", "hello world") == 1.0  # whitespace collapsed


# --- relative -------------------------------------------------------------------------------------

def test_relative_values():
  acc = lambda a, t: rewards.accuracy("relative", resp(a), t)
  assert acc("8", 8) == 1.0
  # |7 - 8| / 8 = 0.125 < tolerances 0.15..0.50 (8 of 10).
  assert acc("7", 8) == pytest.approx(0.8)
  # 0.25: tolerances 0.30..0.50 (5 of 10).
  assert acc("5", 4) == pytest.approx(0.5)
  # 0.5 exactly: no tolerance is strictly larger.
  assert acc("6", 4) == 0.0
  # 0.05 exactly: every tolerance but 0.05 (9 of 10).
  assert acc("9.5", 10) == pytest.approx(0.9)
  assert acc("0", 0) == 1.0 and acc("1", 0) == 0.0
  assert acc("x", 8) == 0.0


# --- garbage never raises -------------------------------------------------------------------------

GARBAGE = [
    None, "", 0, 3.5, b"bytes", ["list"], {"a": 1}, object(), "\x00\x01", "ünïcödé <answer>名</answer>",
    "<answer>" * 1000, "</answer><answer>", "<answer></answer>", "<answer>\n</answer>",
    "<think>" + "x" * 200000, "<answer>" + "9" * 100000 + "</answer>",
    "<answer>1e308*10</answer>", "<answer>NaN</answer>", "<answer>inf,inf,inf,inf</answer>",
    "<answer>[1,2,3,4</answer>", "<think>a</think><answer>3", "<answer>💥</answer>",
]


@pytest.mark.parametrize("reward_type,truth", [
    ("binary", 3), ("binary", "left"), ("binary", 0), ("iou", [0, 0, 10, 10]), ("ocr", "K7QA"),
    ("relative", 8.5), ("relative", 0),
])
def test_garbage_scores_zero_and_never_raises(reward_type, truth):
  for g in GARBAGE:
    value = rewards.accuracy(reward_type, g, truth)
    assert value == 0.0, (reward_type, truth, str(g)[:40], value)


def test_unknown_reward_type_is_an_error():
  with pytest.raises(KeyError, match="unknown reward type 'wer'"):
    rewards.accuracy("wer", resp("1"), 1)


def test_pool_ids_are_dense():
  assert sorted(rewards.POOL_IDS.values()) == list(range(len(rewards.REWARD_TYPES)))
  assert set(rewards.POOL_IDS) == {"binary", "iou", "ocr", "relative"}
  assert all(math.isfinite(v) for v in rewards.POOL_IDS.values())


# --- fuzz: any text built from tags, numbers and junk scores in [0, 1] without raising -------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_PIECES = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>",
                           "3", "-2.5", "[1,2,3,4]", ",", " ", "\n", "left", "K7QA", "é", "\x00",
                           "1e9", "nan", "((", "]"])
_TEXT = st.one_of(st.text(max_size=60), st.lists(_PIECES, max_size=25).map("".join))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=_TEXT)
def test_fuzz_rewards_in_unit_interval(text):
  for reward_type, truth in (("binary", 3), ("binary", "left"), ("iou", [1, 2, 3, 4]),
                             ("ocr", "K7QA"), ("relative", 2.5)):
    v = rewards.accuracy(reward_type, text, truth)
    assert 0.0 <= v <= 1.0 and not math.isnan(v)
  assert parsing.format_reward(text) in (0.0, 1.0)
  # A well-formed response is exactly what split_response accepts.
  if parsing.format_reward(text):
    think, answer = parsing.split_response(text)
    assert text.strip().startswith("<think>") and answer == parsing.extract_answer(text)
