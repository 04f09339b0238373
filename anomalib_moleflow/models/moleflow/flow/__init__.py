"""What all tasks share: the coupling flow (with its subnets' context branch) and the patch mixers
before it. Trained on task 0; V4.1 freezes all of it afterwards."""

from .coupling_subnet import MoLEContextSubnet
from .patch_mixing import LightweightMSContext, SpatialMixer
from .shared_flow import SharedFlow

__all__ = ["LightweightMSContext", "MoLEContextSubnet", "SharedFlow", "SpatialMixer"]
