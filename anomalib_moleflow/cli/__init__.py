"""``anomalib-moleflow`` command line (jsonargparse, anomalib-style configs): one module per subcommand."""

from anomalib_moleflow.cli.app import SUBCOMMANDS, build_parser, error_line, main
from anomalib_moleflow.cli.continual import continual_parser, format_summary

__all__ = ["SUBCOMMANDS", "build_parser", "continual_parser", "error_line", "format_summary", "main"]
