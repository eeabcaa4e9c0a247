"""structlog set-up: JSON or console lines, with the request id bound per request.

Logging is process-wide by nature (stdlib logging and structlog both keep global
configuration), so :func:`configure_logging` is the one global step ``create_app`` takes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["LOGGER_NAME", "configure_logging", "formatter", "get_logger", "gunicorn_log_config"]

LOGGER_NAME = "chatsse"


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def formatter(fmt: str = "console") -> structlog.stdlib.ProcessorFormatter:
    """The log formatter for stdlib handlers: JSON lines or readable console lines."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Route chatsse's (and uvicorn's) logs through structlog's formatter."""
    structlog.configure(
        # filter_by_level first: a disabled level costs one check, not a formatted event.
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.set_name("chatsse")
    numeric = logging.getLevelName(level.upper())
    for name in (LOGGER_NAME, "uvicorn", "uvicorn.error", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if h.get_name() != "chatsse"]
        if name in (LOGGER_NAME, "uvicorn"):
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(numeric)
    # chatsse logs one line per request itself; uvicorn's access log would repeat it.
    logging.getLogger("uvicorn.access").disabled = True


def gunicorn_log_config(level: str = "info", fmt: str = "console") -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: its own lines (and, through its handlers, uvicorn's
    in each worker) in the same format as chatsse's."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"chatsse": {"()": lambda: formatter(fmt)}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "chatsse", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "gunicorn.error": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
        },
    }


def get_logger(name: str = LOGGER_NAME) -> Any:
    return structlog.stdlib.get_logger(name)
