"""What all tasks share: the coupling flow (with its subnets' context branch) and the patch mixers
before it. Trained on task 0; V4.1 freezes all of it afterwards."""

from .coupling_subnet import MoLEContextSubnet
from .cross_patch_coupling import NeighborhoodAttention
from .neighborhood_context import NeighborhoodContextExtractor
from .patch_attention import LightweightPatchAttention
from .patch_mixing import LightweightMSContext, SpatialMixer, TaskConditionedMSContext
from .shared_flow import SharedFlow

__all__ = [
    "LightweightMSContext",
    "LightweightPatchAttention",
    "MoLEContextSubnet",
    "NeighborhoodAttention",
    "NeighborhoodContextExtractor",
    "SharedFlow",
    "SpatialMixer",
    "TaskConditionedMSContext",
]
