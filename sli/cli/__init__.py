"""The ``sli`` command: thin commands that parse, configure logging and call the library."""
from __future__ import annotations

import logging
import sys
from typing import List, Optional

from ..errors import SLIError
from .options import DEFAULT_PROMPT, DEMO_BUDGET_GB, MODES, HelpFormatter
from .parser import build_parser

__all__ = ["DEFAULT_PROMPT", "DEMO_BUDGET_GB", "MODES", "HelpFormatter", "build_parser", "main"]


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the stream of the
    first call), so several ``main()`` calls in one process each reach their own stderr."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(level: int) -> None:
    """sli's own loggers (``sli``, ``sli.*``) print their messages bare on stderr at ``level``."""
    sli_logger = logging.getLogger("sli")
    for handler in [h for h in sli_logger.handlers if isinstance(h, _StderrHandler)]:
        sli_logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    sli_logger.addHandler(handler)
    sli_logger.setLevel(level)
    sli_logger.propagate = False


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = None
    if "bench" in argv and all(a.startswith("-") for a in argv[:argv.index("bench")]):
        # argparse would take `sli bench --synth 7b` for sli's own (unknown) options
        cut = argv.index("bench") + 1
        argv, rest = argv[:cut], argv[cut:]
    try:
        args, extras = parser.parse_known_args(argv)
        if extras and getattr(args, "command", None) == "generate" and not any(e.startswith("-") for e in extras):
            args.words += extras  # `generate MODEL --mode int8 PROMPT`: argparse stops the positionals at an option
        elif extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exc:  # --help, --version, a usage error: a status, also when called in-process
        return exc.code if isinstance(exc.code, int) else 1
    if rest is not None:
        args.rest = rest[1:] if rest[:1] == ["--"] else rest
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _configure_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    if args.quiet or not sys.stderr.isatty():
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return args.func(args)
    except (SLIError, ValueError, KeyError, OSError) as exc:
        if args.verbose:
            raise  # -v: the whole traceback, for a bug report
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"sli: error: {' '.join(str(message).split())}", file=sys.stderr)  # one line, always
        return 1
    except KeyboardInterrupt:
        print("sli: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
