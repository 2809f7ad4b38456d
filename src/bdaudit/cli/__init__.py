"""The ``bdaudit`` command line: parses, calls the library API, prints. Nothing else."""

from bdaudit.cli import cmd_bench, cmd_clean, cmd_info, cmd_plant, cmd_report, cmd_scan, cmd_sequela  # noqa: F401  (each module registers its commands)
from bdaudit.cli.app import app, main

__all__ = ["app", "main"]
