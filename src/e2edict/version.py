"""The package version (its own module, so no module inside the package imports the package)."""

__version__ = "0.1.0"
