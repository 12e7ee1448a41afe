"""Downstream evaluation through EleutherAI's lm-evaluation-harness (``pip install -e '.[eval]'``).

- :mod:`mom.harness.lm`: ``MoMLM``, the harness model ``mom`` (run folder or model folder, packed too).
- :mod:`mom.harness.tasks`: the offline tasks ``shakespeare_next_line`` and ``shakespeare_ppl``, built from
  the embedded corpus on first use.
- :mod:`mom.harness.run`: run tasks from a ``harness`` config node, summarise, save, log.
- ``python -m mom.harness ...``: the harness's own command line with ``--model mom`` and the offline tasks.

The ways in::

    python -m mom.eval run_dir=DIR "harness.tasks=[shakespeare_next_line,shakespeare_ppl]"
    python -m mom.eval run_dir=DIR harness=shakespeare harness.limit=100
    python -m mom.train experiment=tiny harness@eval.harness=shakespeare     # at the end of training
    python -m mom.harness --model mom --model_args run_dir=DIR --tasks hellaswag,shakespeare_ppl

Nothing here imports lm_eval until a task runs, so MoM works without the extra installed.
"""


from mom.errors import MoMError


class HarnessError(MoMError, ValueError):
    """A bad harness request (unknown task or model argument, missing extra, a dataset that cannot be
    loaded): reported as one line by the entry points."""


__all__ = ["HarnessError"]
