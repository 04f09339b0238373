"""Lightning callbacks for continual MoLE-Flow training (one callback per file)."""

from .ogp import OrthogonalGradientProjection
from .router_fit import RouterFitCallback

__all__ = ["OrthogonalGradientProjection", "RouterFitCallback"]
