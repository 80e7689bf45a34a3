"""Third-party chatter (transformers' and torch's warnings, log lines and progress bars) kept out of the terminal."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet():
    """transformers' and torch's warnings and log lines stay out of the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("transformers", "torch.onnx", "torch.export", "torch._export",
                                               "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    from transformers.utils import logging as tf_logging

    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
