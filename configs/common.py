"""Shared defaults for every experiment config: `base_config(tasks)` -> ConfigDict.

Each `configs/<experiment>.py` calls this and changes what differs. Every leaf here is a knob the
trainer reads (`g2rpo_jax.config_utils.validate` checks them), overridable on the command line
as `--config.a.b=value`. Defaults follow SPEC §3-§6 (the released code's choices).

Must not import jax (configs are loaded while parsing flags, before JAX starts); from g2rpo_jax
it reads only the task registry, whose core imports no jax.
"""
from __future__ import annotations

import ml_collections

from g2rpo_jax import tasks as task_suite  # the task core imports no jax (tests/test_tasks.py)

# The six tasks of the built-in suite (one per domain of the paper) and their role for length
# shaping (SPEC §4: perception short, reasoning long, hybrid mid), as the tasks declare them.
ALL_TASKS = task_suite.TASK_NAMES
ROLES = {name: task.role for name, task in task_suite.TASKS.items()}

# (L_min, L_low, L_high, L_max) in response TOKENS (the tokenizer is character-level, tags are
# one token each, EOS counts). The demonstrations are 7-29 tokens for perception tasks, 21-35 for
# hybrids and 23-25 for the arithmetic chain; each window holds its role's demonstrations on the
# plateau and lets the role's natural length drift without leaving it.
LENGTH_WINDOWS = {
    "perception": (1, 4, 30, 48),
    "hybrid": (4, 12, 40, 56),
    "reasoning": (8, 20, 48, 64),
}


def _per_task(values: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({k: tuple(v) for k, v in values.items()})


def base_config(tasks=ALL_TASKS) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # An orbax checkpoint directory (a workdir's `checkpoints/<step>` or a workdir) to start RL
  # from; when set, the warm start is skipped.
  c.init_checkpoint = ""

  c.model = ml_collections.ConfigDict()
  c.model.name = "tiny_vlm"
  # A tiny_vlm preset: nano / small / medium / default / base. "medium" (decoder width 256)
  # rather than "small" (128), measured on the default job on a 2-core CPU: the update's MFU
  # 0.58 vs 0.38 (experiments.bench --only=train_step) and RL's held-out gain over the warm start
  # +4.3 ± 0.8 vs +0.2 ± 0.1 points (3 seeds), for 14.5 min instead of 6.4 (see the README).
  c.model.size = "medium"
  # 4-px patches (64 image tokens on the 32-px tasks): with the preset's 8-px patches the small
  # model stays at chance on counting after 300 counting-only warm-start steps (24%), with 4-px
  # patches it reaches 46% after 200 (the objects are ~6 px, so 8-px patches split them).
  c.model.patch_size = 4
  # The image enters through cross-attention ("tokens" puts 64 patch tokens in the prompt
  # instead), with a 8-wide causal conv over the token embeddings, per-image pixel
  # normalisation and a patch position embedding in the text width. With "tokens" fusion the
  # small model locates the objects a spatial question names but keeps mixing up which is
  # which: spatial-only supervised training plateaus near 50% (2750 steps); with these four
  # it reaches 96% in 300 steps, and the six-task warm start's held-out mean rises from 16 to
  # 23 points at 150 steps. See g2rpo_jax/models/tiny_vlm.py.
  c.model.fusion = "cross"
  c.model.token_conv = 8
  c.model.pixel_norm = "per_image"
  c.model.image_pos_std = 1.0
  # Longest built-in prompt: 49 characters + BOS (no image tokens with "cross" fusion); set
  # ≥ num_image_tokens + that with --config.model.fusion=tokens (64 + 50 for 4-px patches).
  c.model.max_prompt_len = 56
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"

  c.tasks = ml_collections.ConfigDict()
  c.tasks.names = tuple(tasks)
  c.tasks.weights = tuple(1.0 for _ in tasks)
  c.tasks.data_dir = ""  # "" = <workdir>/data
  # Examples per task in the train split. Generated tasks make example i from (task, split,
  # i), so a large split costs nothing; with 2048 the small model memorises its train prompts
  # within the warm start and RL (measured: train accuracy up, held-out flat). With
  # data.source=tfds every example is prepared on disk: lower it there (e.g. 4096).
  c.tasks.train_size = 100_000
  c.tasks.eval_size = 128  # held-out examples per task scored by evaluation
  # Each task's difficulty knobs (the task's docstring lists them), for every split: training,
  # warm start and evaluation all generate at these, e.g. --config.tasks.difficulty.ocr.length=5
  # or --config.tasks.difficulty.arithmetic.ops='+-*'. Defaults as the tasks define them.
  c.tasks.difficulty = ml_collections.ConfigDict(
      {t: dict(task_suite.TASKS[t].default_difficulty) for t in tasks if t in task_suite.TASKS})

  # Where RL prompts come from (g2rpo_jax/data_sources.py). "generate": the built-in tasks made
  # on the fly; "tfds": the same tasks prepared once as TFDS array_record files in
  # tasks.data_dir and mixed by tasks/loader.MixtureLoader.
  c.data = ml_collections.ConfigDict()
  c.data.source = "generate"
  # User JSONL files (tasks/user_data.py records), one RL-only mixture component each. Parallel
  # tuples: `paths` is required, the rest may stay () (defaults: name = file stem, weight 1.0,
  # reward type and role from each record's problem type) or give one value per path.
  c.data.user = ml_collections.ConfigDict()
  c.data.user.paths = ()
  c.data.user.names = ()
  c.data.user.weights = ()
  c.data.user.reward_types = ()  # "binary" / "iou" / "ocr" / "relative" or "" (per record)
  c.data.user.roles = ()  # "perception" / "reasoning" / "hybrid" or "" (from the problem type)
  # Held-out JSONL files scored by evaluation beside the built-in tasks (up to tasks.eval_size
  # records each), one per path or "" for none; () = user data is not evaluated.
  c.data.user.eval_paths = ()

  c.rollout = ml_collections.ConfigDict()
  c.rollout.group_size = 8
  c.rollout.max_new_tokens = 48
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0

  c.batch = ml_collections.ConfigDict()
  c.batch.prompts_per_step = 16  # prompt groups per RL step (after filtering)
  c.batch.num_minibatches = 4  # optimizer steps per rollout batch (SPEC §3)
  # Gradient accumulation inside each optimizer step (same update, less activation memory).
  c.batch.num_microbatches = 1
  # How the rollout batch is dealt into mini-batches: "groups" keeps every prompt group whole
  # in one mini-batch, "rows" spreads each group's responses over all of them.
  c.batch.minibatch_split = "rows"

  c.advantage = ml_collections.ConfigDict()
  c.advantage.name = "g2rpo"
  c.advantage.mode = "group_then_task"
  c.advantage.std = "unbiased"  # GRPO only
  c.advantage.eps = 1e-6  # GRPO only

  c.loss = ml_collections.ConfigDict()
  c.loss.eps_low = 0.2
  c.loss.eps_high = 0.3
  c.loss.dual_clip = 3.0
  c.loss.aggregation = "token_mean"
  # β; 0 keeps no reference model (SPEC §3). > 0: the frozen initial policy (warm start /
  # init_checkpoint) is the reference; its log-probs are computed in the collect stage.
  c.loss.kl_coef = 0.0
  c.loss.kl_estimator = "k3"
  c.loss.log_ratio_clamp = 20.0

  c.shaping = ml_collections.ConfigDict()
  c.shaping.format_weight = 0.1
  c.shaping.length = ml_collections.ConfigDict()
  c.shaping.length.enabled = True
  c.shaping.length.weight = 0.1
  c.shaping.length.thresholds = _per_task({t: LENGTH_WINDOWS[ROLES.get(t, "hybrid")]
                                           for t in tasks})
  # Window of a task without an entry in `thresholds` (user data), by the task's role.
  c.shaping.length.role_thresholds = _per_task(LENGTH_WINDOWS)
  c.shaping.entropy = ml_collections.ConfigDict()
  c.shaping.entropy.enabled = True
  c.shaping.entropy.lam = 0.02
  # "sampled_nll": mean −log π(sampled token) (SPEC §5, released code); "full_vocab": exact.
  c.shaping.entropy.estimator = "sampled_nll"
  c.shaping.entropy.bounds = _per_task({t: (0.2, 0.6) for t in tasks})
  c.shaping.entropy.default_bounds = (0.2, 0.6)  # for tasks without an entry (user data)

  c.filtering = ml_collections.ConfigDict()
  c.filtering.enabled = True
  c.filtering.low = 0.01  # drop groups with mean accuracy <= low or >= high (SPEC §3)
  c.filtering.high = 0.99
  c.filtering.max_rounds = 2  # extra sampling rounds to refill the batch

  c.optimizer = ml_collections.ConfigDict()
  # RL step size (measured on the default job with the "small" model, seed 0, warm start 300
  # steps): 2.5e-4 moves chart down and counting up, net +0.0; 1e-3 on spatial alone collapses
  # its entropy to 0.06 and its held-out score from 36 to 23 within 80 steps; 1e-4 is stable.
  c.optimizer.lr = 1e-4
  c.optimizer.weight_decay = 1e-2
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.grad_clip = 1.0
  c.optimizer.warmup_steps = 0

  # The vision tower's pretraining before the warm start (g2rpo_jax/vision_pretraining.py): the
  # tower alone, through a linear head on its mean-pooled features, learns which tokens each
  # image's demonstration contains. Cached in <workdir>/vision_pretrain; skipped with
  # init_checkpoint and when the warm start is already cached.
  c.vision_pretrain = ml_collections.ConfigDict()
  c.vision_pretrain.enabled = False
  c.vision_pretrain.steps = 600
  c.vision_pretrain.batch_size = 64
  c.vision_pretrain.lr = 2e-3

  c.warm_start = ml_collections.ConfigDict()
  c.warm_start.enabled = True
  c.warm_start.steps = 300
  c.warm_start.batch_size = 32
  c.warm_start.lr = 2e-3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 200
  c.train.log_every = 1
  c.train.eval_every = 50
  c.train.checkpoint_every = 20
  c.train.keep_checkpoints = 3
  c.train.grad_norm_every = 10  # per-task gradient norms (SPEC §7.2) every K steps; 0 = never
  c.train.max_nonfinite = 3  # stop after this many non-finite updates in a row
  c.train.progress_bar = True
  c.train.plots = True

  c.eval = ml_collections.ConfigDict()
  c.eval.temperature = 0.0  # 0 = greedy
  c.eval.batch_size = 64

  # Test hooks; leave at their defaults in real runs.
  c.debug = ml_collections.ConfigDict()
  c.debug.sigkill_after_step = -1  # send ourselves SIGKILL after this step's metrics (tests)
  return c
