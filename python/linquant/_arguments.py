"""argparse pieces shared by the CLI and the benchmarks: a help formatter, and types for which a
bad value is a usage error naming the option, not a traceback (or, for a 0 x K shape, a loop over
millions of zero-byte weight copies)."""

import argparse

import torch


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives each option's default, but for options that are off unless given (a None or
    False default) and those whose help already says it in words."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def shape(text: str) -> str:
    """N x K as two positive integers ("4096x14336"), returned in that canonical spelling."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected N x K as two positive integers such as 4096x4096, got {text!r}")
    return f"{int(parts[0])}x{int(parts[1])}"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def device(text: str) -> torch.device:
    """cpu, cuda or cuda:N; whether this machine has that GPU is the command's to check."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return dev
