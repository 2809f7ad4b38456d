"""The ``bdaudit`` command line: parses, calls the library API, prints. Nothing else.

This package stays light on purpose: ``main`` installs the signal handling before the heavy
imports (torch, timm), so a Ctrl-C while the CLI is still starting exits 130 with one line.
``bdaudit.cli.app`` (the attribute) is the typer app, imported on first use.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from bdaudit.cli.entry import main

__all__ = ["app", "main"]


class _CliPackage(types.ModuleType):
    # A data descriptor wins over the module's __dict__, where the import system records the
    # submodule ``bdaudit.cli.app``: the package attribute keeps meaning the typer app.
    @property
    def app(self) -> Any:
        from bdaudit.cli.entry import load_app

        return load_app()

    @app.setter
    def app(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _CliPackage
