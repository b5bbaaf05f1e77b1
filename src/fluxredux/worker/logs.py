"""How every fluxredux process writes its log: the server, its worker children, the commands.

On a terminal: rich's handler (levels in colour, long lines wrapped to the window). Anywhere
else (a file, journald, ``docker logs``), where lines are grepped, tailed and shipped: one
line per record, never wrapped, the same prefix in the server and in its workers::

    2026-12-03T14:20:01.123Z INFO server: fluxredux serving on http://127.0.0.1:8000 ...
    2026-12-03T14:20:04.560Z INFO worker: prediction Pgdo...: started (attempt 1)

A record's own line breaks (a traceback) are written as ``\\n``, so that a record stays
one line. ``json``: one JSON object per line, on a terminal too, for log shippers:
``{"time", "level", "logger", "message", "process", "pid"}`` (and ``exception``).

Uncaught exceptions go through the same handler (``sys.excepthook``): a crash is a record
too, not a bare traceback between the lines. Python's warnings are records as well.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Literal, TextIO

from fluxredux.config import LogFormat, quiet_libraries

if TYPE_CHECKING:
    from rich.console import Console

# Which of a deployment's processes wrote a record: the HTTP server, a worker, a command.
ProcessName = Literal["server", "worker", "cli"]


def record_time(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds: sortable, and the same on every machine."""
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LineFormatter(logging.Formatter):
    """``TIME LEVEL PROCESS: message``, one line per record whatever the message holds."""

    def __init__(self, process: ProcessName) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record_time(record)} {record.levelname} {self.process}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text.replace("\r", "\\r").replace("\n", "\\n")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (one line: json.dumps escapes line breaks)."""

    def __init__(self, process: ProcessName) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": record_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_handler(
    process: ProcessName,
    log_format: LogFormat,
    stream: TextIO,
    *,
    prefix: str = "",
    console: Console | None = None,
) -> logging.Handler:
    """The handler for ``stream``: JSON, rich's on a terminal, else one plain line per record.

    ``prefix`` marks a process's lines in rich's output (``worker: ``), where the plain
    lines carry the process name anyway. ``console``: the rich console the command also
    shows its progress on (records then print above a live progress bar, not through it)."""
    if log_format == "json":
        handler: logging.Handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter(process))
        return handler
    if stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=console or Console(file=stream), show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
        return handler
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LineFormatter(process))
    return handler


def configure_logging(
    process: ProcessName,
    log_format: LogFormat = "text",
    *,
    verbose: bool = False,
    stream: TextIO | None = None,
    prefix: str = "",
    console: Console | None = None,
) -> None:
    """The root logger of this process: one handler (see ``log_handler``) on ``stream``
    (stderr), INFO (DEBUG with ``verbose``), libraries' chatter quieted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        handlers=[log_handler(process, log_format, stream or sys.stderr, prefix=prefix, console=console)],
        force=True,
    )
    logging.captureWarnings(True)
    quiet_libraries(verbose)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


_crash_log = logging.getLogger("fluxredux.crash")


def _log_uncaught(kind: type[BaseException], exc: BaseException, traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, traceback)
        return
    _crash_log.critical("uncaught exception: %s", exc, exc_info=(kind, exc, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    _crash_log.critical(
        "uncaught exception in thread %s: %s",
        name,
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
