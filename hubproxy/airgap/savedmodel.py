"""The optional TensorFlow side (extra `client`): the only module allowed to import tensorflow.

Invariants: importing this module never imports tensorflow; callers learn whether it is there
by getting None instead of a loader.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable


def saved_model_loader() -> Callable[[Path], str | None] | None:
    """A function that loads a SavedModel directory and returns None or the one-line problem;
    None when tensorflow is not installed."""
    if importlib.util.find_spec("tensorflow") is None:
        return None

    def load(directory: Path) -> str | None:
        import tensorflow as tf

        try:
            tf.saved_model.load(str(directory))
        except Exception as e:  # any failure to load is the finding we report
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    return load
