"""Converters from Hugging Face checkpoints to ours, one module per family, in one registry.

``CONVERTERS[model_type](config, state) -> (TransformerConfig, state dict)``: pure functions,
each with the list of config fields it understands (see :mod:`.common`).
"""

from __future__ import annotations

from collections.abc import Callable

from mechscope.lm.models.convert.common import StateDict
from mechscope.lm.models.convert.gemma import convert_gemma, convert_gemma2, convert_gemma3_text
from mechscope.lm.models.convert.gpt2 import convert_gpt2
from mechscope.lm.models.convert.gpt_neo import convert_gpt_neo
from mechscope.lm.models.convert.gptj import convert_gptj
from mechscope.lm.models.convert.llama import convert_llama, convert_mistral, convert_qwen2, convert_qwen3
from mechscope.lm.models.convert.neox import convert_gpt_neox
from mechscope.lm.models.convert.opt import convert_opt
from mechscope.lm.models.convert.phi3 import convert_phi3
from mechscope.lm.models.transformer import TransformerConfig

Converter = Callable[[dict, StateDict], tuple[TransformerConfig, StateDict]]

CONVERTERS: dict[str, Converter] = {
    "gpt2": convert_gpt2,
    "llama": convert_llama,
    "gpt_neox": convert_gpt_neox,
    "gpt_neo": convert_gpt_neo,
    "gptj": convert_gptj,
    "opt": convert_opt,
    "qwen2": convert_qwen2,
    "qwen3": convert_qwen3,
    "mistral": convert_mistral,
    "gemma": convert_gemma,
    "gemma2": convert_gemma2,
    "gemma3_text": convert_gemma3_text,
    "phi3": convert_phi3,
}

__all__ = ["CONVERTERS", "Converter"] + [f.__name__ for f in CONVERTERS.values()]
