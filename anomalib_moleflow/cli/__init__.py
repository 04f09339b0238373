"""``anomalib-moleflow`` command line (jsonargparse, anomalib-style configs): one module per subcommand."""

import warnings

# Importing anomalib 2.7 loads all of its models, two of which import modules that timm and anomalib
# have deprecated; the command uses neither, so these two notes would only clutter its output.
for _note in (r"Importing from timm\.models\.layers is deprecated", r"The anomalib\.models\.components\.dinov2 "):
    warnings.filterwarnings("ignore", message=_note, category=FutureWarning)

from anomalib_moleflow.cli.app import SUBCOMMANDS, build_parser, error_line, main  # noqa: E402
from anomalib_moleflow.cli.continual import continual_parser, format_summary  # noqa: E402

__all__ = ["SUBCOMMANDS", "build_parser", "continual_parser", "error_line", "format_summary", "main"]
