"""G²RPO on the task mix with a real policy: Qwen2.5-VL from a Hugging Face checkpoint.

  python -m experiments.train --config=configs/qwen25vl.py \
      --config.model.checkpoint_dir=/ckpt/Qwen2.5-VL-3B-Instruct --workdir=workdirs/qwen25vl

Sized for accelerators (TPU / GPU), not the 2-core CPU: parameters and optimizer state are
sharded FSDP over every device (`mesh.fsdp=-1`), params and activations are bf16 (norms,
softmax, rotary and the log-probs stay f32 inside the model), and every decoder layer and
vision block is rematerialised in the backward pass. The instruct checkpoint already follows
instructions, so there is no warm start. SPEC §3 defaults otherwise (lr 2e-6, AdamW wd 1e-2,
clip 1.0, group size 8, 4 mini-batches per rollout batch); length windows are in Qwen tokens.

`arg`: "<checkpoint_dir>" or "<checkpoint_dir>,<seed>" (same as the flags above).
Before a long run, check the port on the checkpoint:
  python -m experiments.check_parity --hf_dir=/ckpt/Qwen2.5-VL-3B-Instruct
"""
import ml_collections

from configs import common

# (L_min, L_low, L_high, L_max) in Qwen tokens per role (SPEC §4: perception short, reasoning
# long, hybrid in between); the paper gives no numbers, these bracket typical instruct answers.
LENGTH_WINDOWS = {
    "perception": (4, 16, 256, 512),
    "hybrid": (16, 64, 512, 768),
    "reasoning": (32, 128, 768, 1024),
}


def get_config(arg=None):
  c = common.base_config(common.ALL_TASKS)
  checkpoint_dir, _, seed = (arg or "").partition(",")
  if seed:
    c.seed = int(seed)
  c.init_checkpoint = ""

  # The model section is the port's own ModelConfig (g2rpo_jax/models/qwen25vl.py); the
  # architecture is read from checkpoint_dir/config.json.
  c.model = ml_collections.ConfigDict()
  c.model.name = "qwen25vl"
  c.model.checkpoint_dir = checkpoint_dir
  c.model.load_weights = True
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.model.max_prompt_len = 640  # ChatML system + user turn + up to 256 image tokens
  c.model.max_images = 1
  c.model.min_pixels = 56 * 56
  c.model.max_pixels = 28 * 28 * 256  # <= 256 merged image tokens per image
  c.model.system_prompt = "You are a helpful assistant."

  c.rollout.group_size = 8
  c.rollout.max_new_tokens = 1024
  c.rollout.temperature = 1.0

  c.batch.prompts_per_step = 128
  c.batch.num_minibatches = 4

  c.optimizer.lr = 2e-6
  c.optimizer.weight_decay = 1e-2
  c.optimizer.grad_clip = 1.0
  c.optimizer.warmup_steps = 0

  c.warm_start.enabled = False
  c.vision_pretrain.enabled = False  # the checkpoint's tower is already trained

  c.shaping.length.thresholds = ml_collections.ConfigDict(
      {t: LENGTH_WINDOWS[common.ROLES.get(t, "hybrid")] for t in c.tasks.names})

  # FSDP over all devices; tensor parallelism stays available as --config.mesh.tensor=N.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1

  c.train.num_steps = 500
  c.train.eval_every = 50
  c.train.checkpoint_every = 25
  c.eval.batch_size = 128
  return c
