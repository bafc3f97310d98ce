"""g2rpo_jax: Gaussian GRPO (G²RPO) for multimodal reinforcement learning in JAX/Flax.

The math lives in small pure modules (`advantages`, `losses`, `shaping`, `diagnostics`);
models, rollout, tasks and the trainer build on them. See README.md and SPEC.md.
"""

__version__ = "0.1.0"
