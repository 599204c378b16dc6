"""The worker process and its parts; see process.py for how they fit."""

from .process import Worker

__all__ = ["Worker"]
