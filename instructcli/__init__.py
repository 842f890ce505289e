"""instruct: the InstructGPT recipe on one machine."""

__version__ = "0.1.0"
