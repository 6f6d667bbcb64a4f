"""The version of the core distribution (one place; ``mltl.__version__`` re-exports it)."""

__version__ = "0.1.0"
