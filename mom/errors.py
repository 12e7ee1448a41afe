"""MoM's error classes: every bad input a user can give is a :class:`MoMError`.

A config value, a data file, a checkpoint, a prompt: each raises a subclass of :class:`MoMError` whose
message is one line naming the key or the file. The entry points catch ``MoMError`` in one place
(:func:`mom.cli.one_line_errors`) and print ``error: <message>`` on stderr, exit code 1, no traceback; any
other exception is a bug and keeps its traceback.

The subclasses live next to the code that raises them:

- :class:`mom.model.config.ConfigError`: a bad configuration value (``model.num_attention_heads: ...``)
- :class:`mom.slm.SlmError`: a bad selective-LM set-up (a ``ConfigError``)
- :class:`mom.data.corpus.DataError`: unusable data (missing file, empty corpus, too few tokens)
- :class:`mom.run_folder.RunFolderError`: a missing run or model folder, a tokenizer that is not the model's
- :class:`mom.eval.EvalError`, :class:`mom.model.generation.GenerationError`, :class:`mom.export.ExportError`
- :class:`mom.harness.HarnessError`: an unknown harness task, a missing ``eval`` extra, an unreachable dataset
- :class:`CheckpointError` and :class:`NonFiniteLossError` (here: raised by several modules)

This module imports nothing from the project, so any module can import it.
"""

from __future__ import annotations


class MoMError(Exception):
    """Bad input from the user (reported as one ``error:`` line), as opposed to a bug (a traceback)."""


class CheckpointError(MoMError, ValueError):
    """A checkpoint that cannot be used: missing, truncated or corrupt, not weights-only, or for another model."""


class NonFiniteLossError(MoMError, RuntimeError):
    """Training met a non-finite (NaN/inf) loss and ``callbacks.nonfinite.action`` is ``stop``."""


__all__ = ["CheckpointError", "MoMError", "NonFiniteLossError"]
