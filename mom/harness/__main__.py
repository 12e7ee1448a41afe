"""``python -m mom.harness [run] --model mom --model_args run_dir=DIR --tasks ...``: the harness's own CLI.

lm-evaluation-harness 0.4.x finds a model only in its registry, which holds the built-in models and the
classes of modules already imported; it has no plugin hook (entry point or import flag) through which a bare
``lm_eval`` could find ``mom``. This module is ``lm_eval``'s command line after importing
:mod:`mom.harness.lm` (which registers ``mom``), with the offline tasks' folder as ``--include_path`` (unless the command line names another folder).
Every other flag is the harness's (``--num_fewshot``, ``--limit``, ``--batch_size``, ``--output_path``,
``--log_samples``, ``--wandb_args`` ...); ``python -m mom.harness ls tasks`` lists the tasks.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from mom.cli import fail
    from mom.harness import HarnessError
    from mom.harness.run import require_lm_eval

    try:
        require_lm_eval()
        import mom.harness.lm  # noqa: F401  (registers the model "mom")
        from mom.harness.tasks import offline_task_dir

        tasks_dir = str(offline_task_dir())
    except HarnessError as e:
        fail(e)
    args = list(sys.argv[1:] if argv is None else argv)
    # the harness takes one task folder: ours unless the user names another
    if args and args[0] not in ("-h", "--help") and "--include_path" not in args:
        args += ["--include_path", tasks_dir]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    except HarnessError as e:
        fail(e)


if __name__ == "__main__":
    main()
