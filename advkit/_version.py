"""The package version, in a module of its own so that low layers (``advkit.environment``)
can read it without importing the package front door."""

__version__ = "0.1.0"
