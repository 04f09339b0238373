"""Post-processing of a model that normalises its scores per task itself."""

from __future__ import annotations

from typing import Any

from anomalib.post_processing import PostProcessor


class NormalizedScorePostProcessor(PostProcessor):
    """anomalib post-processor for scores the model already normalised per task (threshold 0.5 in
    ``[0, 1]``): labels and masks at 0.5, values passed through.

    Its statistics stay fixed: anomalib's post-processor recalibrates itself on the validation
    outputs of a fit, which for this model are raw scores (a task's thresholds are fitted at the end
    of its training) and would afterwards squash the normalised scores.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, value in (
            ("_image_threshold", 0.5),
            ("_pixel_threshold", 0.5),
            ("image_min", 0.0),
            ("image_max", 1.0),
            ("pixel_min", 0.0),
            ("pixel_max", 1.0),
        ):
            getattr(self, name).fill_(value)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Keep the fixed statistics (no threshold or min-max metric update)."""
        del args, kwargs

    def on_validation_epoch_end(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """Keep the fixed statistics (no recalibration)."""
        del args, kwargs


def normalized_score_post_processor() -> PostProcessor:
    """anomalib post-processor for scores the model already normalised per task (threshold 0.5 in
    ``[0, 1]``): labels and masks at 0.5, values passed through (:class:`NormalizedScorePostProcessor`)."""
    return NormalizedScorePostProcessor()
