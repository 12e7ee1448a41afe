"""The one wrapper around every ``python -m mom.<tool>`` entry point: bad input is one line, not a traceback.

Each entry point is a ``@hydra.main`` function whose body runs inside :func:`one_line_errors` and whose
``__main__`` block calls :func:`run_cli`:

- a :class:`mom.errors.MoMError` (or a ``FileNotFoundError`` naming a path the user gave) raised by the job
  is printed as ``error: <message>`` on stderr, one line, exit code 1 (:func:`fail`); Ctrl-C ends with
  ``error: interrupted`` and exit code 130. Any other exception is a bug and keeps its traceback.
- errors Hydra raises itself while composing the config (an unknown experiment or preset, a misspelt key, a
  value of the wrong type) would be printed by Hydra over several lines: :func:`run_cli` composes the
  command line once before handing it to Hydra and reports such an error as one line too (exit code 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from mom.errors import MoMError

# A missing file the user named is bad input too (Python's message names the path).
USER_ERRORS: tuple[type[BaseException], ...] = (MoMError, FileNotFoundError)


def one_line(message: Any) -> str:
    """``message`` as a single line (inner newlines and runs of spaces collapsed)."""
    return " ".join(str(message).split())


def fail(message: Any, code: int = 1) -> NoReturn:
    """Print ``error: <message>`` on stderr as one line and exit with ``code`` (no traceback)."""
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Run an entry point's job: user errors become one ``error:`` line (exit 1), Ctrl-C exit 130."""
    try:
        yield
    except USER_ERRORS as e:
        fail(e)
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # end a partly written line (generate streams its text)
        fail("interrupted", code=130)


# ------------------------------------------------------------------------------------ Hydra composition
_HYDRA_FLAGS_WE_LEAVE_ALONE = ("-", )  # any flag (-m, --multirun, --cfg, --help, -cn ...): plain Hydra


def hydra_error_line(exc: BaseException) -> str:
    """One line for an exception raised while Hydra composes a config, naming the key or the option."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, MissingConfigException):
        missing = str(getattr(exc, "missing_cfg_file", "") or "")
        group, _, option = missing.rpartition("/")
        options = list(getattr(exc, "options", None) or [])
        if group and options:
            return (f"{group}={option}: unknown {group} option (no conf/{missing}.yaml); "
                    f"available: {', '.join(sorted(options))}")
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # the OmegaConf error behind Hydra's names the full key
        seen.add(id(e))
        if isinstance(e, OmegaConfBaseException):
            key = getattr(e, "full_key", None)
            msg = str(getattr(e, "msg", None) or e).splitlines()[0].strip()
            if key:
                return f"{key}: {msg}"
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return one_line(" ".join(lines[:2])) if lines else type(exc).__name__


def preflight(config_name: str, overrides: Sequence[str]) -> str | None:
    """Compose ``config_name`` with the command line's overrides (Hydra's own keys left out): the one-line
    error Hydra would otherwise print over several lines, or None when the config composes."""
    from mom.config import compose

    ours = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/", "hydra="))]
    try:
        compose(config_name, ours)
    except Exception as e:  # noqa: BLE001 - every composition error becomes one line
        return hydra_error_line(e)
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
    return None


def run_cli(hydra_main: Callable[[], Any], config_name: str, argv: Sequence[str] | None = None) -> Any:
    """Run a ``@hydra.main`` function, reporting a config that does not compose as one line (exit 1).

    Command lines with flags (``-m``, ``--cfg``, ``--help`` ...) go to Hydra unchecked.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith(_HYDRA_FLAGS_WE_LEAVE_ALONE) for a in args):
        problem = preflight(config_name, args)
        if problem is not None:
            fail(problem, code=1)
    return hydra_main()


__all__ = ["USER_ERRORS", "fail", "hydra_error_line", "one_line", "one_line_errors", "preflight", "run_cli"]
