"""The package version, in a module of its own so that the command line can show it without
importing the package root (which runs the command line)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
