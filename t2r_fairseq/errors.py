"""Errors a user can fix (a bad flag, file or combination of flags), and how they reach the user.

Library code raises T2RUsageError (a ValueError: Python API users catch it as one), its message
naming the flag or file and the fix. t2r_fairseq's own CLIs print it as one line and exit 2.
fairseq's CLIs (fairseq-train, fairseq-generate, ...) own their main(), so the plugin's one way
to spare their users a traceback for such an error is the interpreter's last-resort hook: it
prints `prog: error: message` for these errors only (exit status 1, Python's for an uncaught
exception) and leaves every other exception to the hook it replaced.
"""
import os
import sys


class T2RUsageError(ValueError):
    """Something the user can fix; the message says what and how."""


def _print_usage_errors_in_one_line(previous_hook):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, T2RUsageError):
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
            print(f"{prog}: error: {exc}", file=sys.stderr)
        else:
            previous_hook(exc_type, exc, tb)

    hook.t2r_usage_errors = True
    return hook


def report_usage_errors_in_one_line():
    """Install the hook, once per process however often the plugin is imported."""
    if not getattr(sys.excepthook, "t2r_usage_errors", False):
        sys.excepthook = _print_usage_errors_in_one_line(sys.excepthook)
