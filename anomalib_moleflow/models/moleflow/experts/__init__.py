"""What each task adds: LoRA pairs and biases in the shared flow's linears, an input adapter before
the flow, and a deep invertible adapter (DIA) after it. Each starts as the identity."""

from .dia import AffineCouplingBlock, DeepInvertibleAdapter
from .input_adapters import FiLMAdapter, WhiteningAdapter, build_input_adapter
from .lora import LoRALinear

__all__ = [
    "AffineCouplingBlock",
    "DeepInvertibleAdapter",
    "FiLMAdapter",
    "LoRALinear",
    "WhiteningAdapter",
    "build_input_adapter",
]
