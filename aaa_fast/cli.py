"""Argument helpers shared by the two command lines, `python -m aaa_fast.train` and
`python -m aaa_fast.evaluate`: help that shows every default, and numbers checked against a range."""
from __future__ import annotations

import argparse
import math
import os

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's fixed default (per-method
    defaults are spelled out in the flag's help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def number_arg(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """argparse type: a finite number within [lo, hi] (or open ends), with a clear message. Floats
    must fit float32 (budgets and rates end up in float32 tensors)."""
    def parse(text: str):
        try:
            if "/" in text and kind is float:  # budgets are often written as fractions: 8/255
                num, den = text.split("/")
                value = float(num) / float(den)
            else:
                value = kind(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"{text!r} does not fit in float32 (max {FLOAT32_MAX:.3g})")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {value}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {value}")
        return value
    return parse


def refuse_existing_output(path: str, flag: str) -> None:
    """Results are never overwritten: refuse, naming the flag, an output file that exists."""
    if os.path.exists(path):
        raise SystemExit(f"error: {path} exists; results are never overwritten: choose another {flag} or move it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise SystemExit(f"error: {flag} {path}: its directory {parent} does not exist (or is not a directory)")


def check_device(device: str) -> None:
    """Refuse --device cuda on a machine without a usable CUDA device, before anything is written."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (this torch: "
                         f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
