"""Silence the exporter's and quantizer's progress chatter without touching global logging config."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet():
    # torch.onnx prints progress lines to stdout, the ORT quantizer calls logging.warning() on the
    # root logger (which would otherwise install a stderr handler for the caller), and both emit
    # UserWarnings. Everything is restored on exit, so callers' logging setup is unaffected.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
