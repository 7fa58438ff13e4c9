"""dst-train: a DeepSpeed trainer for proactive video assistants with dialog-state tracking."""

__version__ = "0.1.0"
