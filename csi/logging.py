"""Log sinks (human text or JSON lines) and secret redaction for logged requests.

betterproto drops the `csi_secret` field option of the CSI proto, so fusecsi redacts by field
name: every CSI field that carries secrets is called `secrets`.
"""

from __future__ import annotations

import sys
from typing import Any

import betterproto
from loguru import logger

from csi.settings import Settings

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DDTHH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "{message} <dim>{extra}</dim>"
)


def configure_logging(settings: Settings) -> None:
    """Route loguru to stderr in the chosen format (JSON lines carry the bound context)."""
    logger.remove()
    if settings.log_format == "json":
        logger.add(sys.stderr, level=settings.log_level, serialize=True, enqueue=False)
    else:
        logger.add(sys.stderr, level=settings.log_level, format=TEXT_FORMAT, colorize=False)


def redact(value: Any) -> Any:
    """A copy of a request dict with the values of every `secrets` map replaced."""
    if isinstance(value, dict):
        return {
            key: (
                {name: "***" for name in item}
                if key == "secrets" and isinstance(item, dict)
                else redact(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def loggable(message: betterproto.Message) -> dict[str, Any]:
    """A request as a dict that is safe to log."""
    return dict(redact(message.to_dict(casing=betterproto.Casing.SNAKE)))  # type: ignore[arg-type]
