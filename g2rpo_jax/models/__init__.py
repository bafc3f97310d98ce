"""Policy models behind one interface (`interface.py`): the built-in `tiny_vlm` and ports.

Import `build_model` / `build_processor` from here; a model family registers itself with
`register_model` in its own module (`g2rpo_jax.models.<name>` is imported on first use).
"""
from g2rpo_jax.models.interface import (
    IMAGE_MARKER,
    LOGICAL_AXES,
    KVCache,
    PolicyModel,
    Processor,
    PromptBatch,
    Tokenizer,
    build_model,
    build_processor,
    config_from_mapping,
    merge_model,
    register_model,
    registered_models,
    repeat_rows,
    sequence_logprobs,
    split_model,
    to_dtype,
)
from g2rpo_jax.models.tokenizer import CharTokenizer, HFTokenizer
from g2rpo_jax.models.tiny_vlm import (
    SIZES as TINY_VLM_SIZES,
    TinyVLM,
    TinyVLMConfig,
    TinyVLMProcessor,
    tiny_vlm_config,
)
