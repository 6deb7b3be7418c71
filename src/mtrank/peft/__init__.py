"""Parameter-efficient fine-tuning of a trained ranker: adapters, LoRA and prefix-tuning.

Build a :class:`PeftModel` around the base model, inject one or more named sets, train
:meth:`PeftModel.trainable_parameters`, and save each set with :func:`save_peft_set`.
"""

from mtrank.peft import adapter as _adapter  # noqa: F401  (registers "adapter")
from mtrank.peft import lora as _lora  # noqa: F401  (registers "lora")
from mtrank.peft import prefix as _prefix  # noqa: F401  (registers "prefix")
from mtrank.peft.adapter import AdapterOptions, BottleneckAdapter
from mtrank.peft.base import (
    PEFT_METHODS,
    MethodOptions,
    PeftMethod,
    StandalonePeftModule,
    build_peft_method,
    peft_method_names,
    register_peft_method,
)
from mtrank.peft.inject import ParameterCounts, PeftModel, PeftSetSpec
from mtrank.peft.io import (
    PeftSetFiles,
    SavedPeftSet,
    list_peft_sets,
    load_peft_set,
    peft_set_files,
    read_peft_set,
    save_peft_set,
)
from mtrank.peft.lora import LoraEmbedding, LoraLinear, LoraOptions
from mtrank.peft.prefix import PrefixEncoder, PrefixOptions
from mtrank.peft.wrapper import InjectedModule, PeftWrapper

__all__ = [
    "PEFT_METHODS",
    "AdapterOptions",
    "BottleneckAdapter",
    "InjectedModule",
    "LoraEmbedding",
    "LoraLinear",
    "LoraOptions",
    "MethodOptions",
    "ParameterCounts",
    "PeftMethod",
    "PeftModel",
    "PeftSetFiles",
    "PeftSetSpec",
    "PeftWrapper",
    "PrefixEncoder",
    "PrefixOptions",
    "SavedPeftSet",
    "StandalonePeftModule",
    "build_peft_method",
    "list_peft_sets",
    "load_peft_set",
    "peft_method_names",
    "peft_set_files",
    "read_peft_set",
    "register_peft_method",
    "save_peft_set",
]
