"""The version, in a module that imports nothing: every layer records it in its outputs."""

__version__ = "0.1.0"
