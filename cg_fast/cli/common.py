"""Small helpers shared by the command modules: names with a did-you-mean, device choice, JSON output paths.
No command logic lives here."""
from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Sequence

import torch

__all__ = ["check_names", "positive_int", "pick_device"]


def check_names(given: Iterable[str], choices: Sequence[str], what: str) -> list[str]:
    """``given`` in order, without repeats; an unknown one is a ValueError naming the choices (and the closest)."""
    out: list[str] = []
    for name in given:
        if name not in choices:
            close = difflib.get_close_matches(name, list(choices), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown {what} {name!r}{hint}: choose from {', '.join(choices)}")
        if name not in out:
            out.append(name)
    return out


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def pick_device(name: str | None) -> torch.device:
    """--device, else CUDA when available, else the CPU; a CUDA device that is not there is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device
