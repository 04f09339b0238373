"""What each task adds: LoRA pairs (or SC-LoRA grids of pairs) and biases in the shared flow's
linears, an input adapter before the flow, and a deep invertible adapter (DIA) after it. Each starts
as the identity."""

from .dia import AffineCouplingBlock, DeepInvertibleAdapter
from .input_adapters import FiLMAdapter, InstanceNormMLPAdapter, WhiteningAdapter, build_input_adapter
from .lora import LoRALinear
from .spatial_lora import SpatialLoRALinear

__all__ = [
    "AffineCouplingBlock",
    "DeepInvertibleAdapter",
    "FiLMAdapter",
    "InstanceNormMLPAdapter",
    "LoRALinear",
    "SpatialLoRALinear",
    "WhiteningAdapter",
    "build_input_adapter",
]
