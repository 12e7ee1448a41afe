"""Prompts exactly as typed, for ``python -m mom.generate``.

Hydra parses every ``key=value`` of a command line with its override grammar, where a comma makes a list, an
apostrophe opens a quoted string and ``${...}`` is an interpolation: ``prompt=Now is the winter of our
discontent, made glorious summer`` or ``prompt=What's in a name?`` would fail or change. So the generate entry
point takes its prompt arguments out of ``sys.argv`` before Hydra sees them (:func:`take_prompt_args`) and
reads them here:

- ``prompt=TEXT``: the text as typed: commas, apostrophes, quotes, colons, ``=``, brackets, ``${..}`` are
  kept; ``\\n`` becomes a newline, ``\\t`` a tab and ``\\\\`` one backslash. A value wrapped in one pair of
  matching quotes loses them (Hydra's own quoting, ``prompt='...'``, keeps working). Several ``prompt=`` are
  several prompts (decoded as a batch).
- ``prompt=-``: the prompt is read from stdin (all of it).
- ``prompt_file=PATH``: the prompt is the file's text; a ``.jsonl`` file holds one prompt per line (a JSON
  string, or an object with a ``prompt`` or ``text`` field).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from mom.errors import MoMError

PROMPT_KEYS = ("prompt", "prompt_file")
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


class PromptError(MoMError, ValueError):
    """A prompt that cannot be read (missing file, empty stdin, bad JSON line): one line for the user."""


def take_prompt_args(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a command line into (what Hydra gets, the prompt arguments as (key, raw value) in order).

    ``prompt=``, ``+prompt=``, ``++prompt=`` and the same for ``prompt_file`` are taken; the value is
    everything after the first ``=``, untouched by the shell-level quoting that already happened.
    """
    rest: list[str] = []
    taken: list[tuple[str, str]] = []
    for arg in argv:
        key, eq, value = arg.lstrip("+").partition("=")
        if eq and key in PROMPT_KEYS:
            taken.append((key, value))
        else:
            rest.append(arg)
    return rest, taken


def unescape(text: str) -> str:
    """``\\n`` -> newline, ``\\t`` -> tab, ``\\\\`` -> backslash; any other backslash stays as typed."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of ``prompt_file``: the whole text, or one per line of a ``.jsonl`` file."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise PromptError(f"prompt_file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix != ".jsonl":
        return [text[:-1] if text.endswith("\n") else text]
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{p}:{n}: not a JSON line ({e.msg})") from None
        if isinstance(item, dict):
            item = item.get("prompt", item.get("text"))
        if not isinstance(item, str):
            raise PromptError(f"{p}:{n}: expected a JSON string or an object with a 'prompt' field")
        prompts.append(item)
    if not prompts:
        raise PromptError(f"{p}: no prompt in the file")
    return prompts


def prompts_from_args(taken: Sequence[tuple[str, str]], stdin: TextIO | None = None) -> list[str]:
    """The prompts the (key, raw value) pairs of :func:`take_prompt_args` mean, in the order given."""
    prompts: list[str] = []
    for key, raw in taken:
        if key == "prompt_file":
            prompts.extend(read_prompt_file(_unquote(raw)))
        elif raw == "-":
            text = (stdin or sys.stdin).read()
            prompts.append(text[:-1] if text.endswith("\n") else text)
        else:
            prompts.append(unescape(_unquote(raw)))
    return prompts


__all__ = ["PROMPT_KEYS", "PromptError", "prompts_from_args", "read_prompt_file", "take_prompt_args", "unescape"]
