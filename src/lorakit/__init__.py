"""lorakit: a fast, exact LoRA engine for diffusers pipelines, without PEFT.

Example:
    >>> import lorakit
    >>> lorakit.attach(pipe)                                      # doctest: +SKIP
    >>> pipe.load_lora_weights("style.safetensors", adapter_name="style")   # doctest: +SKIP
    >>> pipe.set_adapters("style", 0.8)                            # doctest: +SKIP
"""

from .adapter import Adapter, LokrWeights, LoraWeights, WeightDelta
from .binding import attach, compile
from .errors import AdapterError, FusingError, LoraError, LoraFileError, LoraKeyError, LoraShapeError
from .manager import LoraManager

__version__ = "0.1.0"

__all__ = ["attach", "compile", "LoraManager", "LoraError", "LoraFileError", "LoraKeyError", "LoraShapeError", "AdapterError",
           "FusingError", "Adapter", "LoraWeights", "LokrWeights", "WeightDelta", "__version__"]
