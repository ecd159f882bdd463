"""Error types the command line maps to exit codes.

``UsageError``: what the user gave is wrong (a config value, a flag, a file or directory named, a
workdir in use, a resume with another config): exit 2. Any other failure that ends a run (disk
full, a damaged checkpoint with nothing to fall back to, a non-finite streak): exit 1.
"""

from __future__ import annotations


class UsageError(ValueError):
    """The user's input is wrong; the message names the key, path or value and what is valid."""


__all__ = ["UsageError"]
