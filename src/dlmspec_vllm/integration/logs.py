"""This package's log lines in vLLM's log.

vLLM configures only its own `vllm` logger (handler, format with the process name, level from
VLLM_LOGGING_LEVEL); a record of a `dlmspec_vllm.*` logger never reaches it. Without this, a
vLLM server printed none of our INFO lines (drafter loaded, the controller summary every 10 s),
and our errors only through Python's last-resort handler: bare text on stderr, with no level,
time or process. Here the package logger gets vLLM's level and a handler that passes each record
to the handlers vLLM's logger has when the record is emitted (vLLM may configure its logging
after plugins load), or to Python's last-resort handler while it has none. Records still
propagate as usual, so an application's own root handlers see them too. Nothing is done when
vLLM's logging is turned off (VLLM_CONFIGURE_LOGGING=0) or our logger already has handlers.
"""

from __future__ import annotations

import logging

PACKAGE_LOGGER = "dlmspec_vllm"
VLLM_LOGGER = "vllm"


class VllmHandlers(logging.Handler):
    """Passes a record to every handler of vLLM's logger that accepts its level."""

    def emit(self, record: logging.LogRecord) -> None:
        handlers = logging.getLogger(VLLM_LOGGER).handlers
        if not handlers:
            last_resort = logging.lastResort
            handlers = [last_resort] if last_resort is not None else []
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def use_vllm_log_handlers() -> None:
    import vllm.envs as envs

    ours = logging.getLogger(PACKAGE_LOGGER)
    if not envs.VLLM_CONFIGURE_LOGGING or ours.handlers:
        return
    ours.addHandler(VllmHandlers())
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.getLevelName(str(envs.VLLM_LOGGING_LEVEL).upper()))
