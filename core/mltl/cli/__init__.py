"""The command line (mltl ...), its console, the generated references and the plugin scaffold."""

from .commands import main

__all__ = ["main"]
