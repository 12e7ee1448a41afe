"""The README runs as written: its Python blocks execute, and each `python -m mom.<tool>` line of its shell
blocks composes (the newest run folder standing for `$RUN`, as the README's own `RUN=$(...)` line finds it)."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from tests.helpers import REPO
from tests.helpers.run_folder import make_run

README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    """A working directory holding what `make train` leaves: outputs/<date>/<time>/ (a tiny run folder)."""
    root = tmp_path_factory.mktemp("readme")
    built = make_run(root / "build")
    target = root / "outputs" / "2026-11-29" / "10-00-00"
    target.parent.mkdir(parents=True)
    built.rename(target)
    return root


def test_readme_python_blocks_run_as_written(cwd, monkeypatch, capsys):
    blocks = _blocks("python")
    assert blocks and any("mom.load(" in b for b in blocks)
    monkeypatch.chdir(cwd)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:\n")


def test_readme_load_gives_model_and_tokenizer(cwd):
    import mom

    run = cwd / "outputs" / "2026-11-29" / "10-00-00"
    for folder in (run, run / "model"):
        model, tok = mom.load(folder)
        ids = tok.encode("the king café")
        assert tok.decode(ids) == "the king café" and tok.vocab_size == model.config.vocab_size
        assert tuple(tok.encode("the king", return_tensors=True).shape) == (1, len(tok.encode("the king")))
    from mom.run_folder import RunFolderError

    with pytest.raises(RunFolderError, match="has no model/ folder"):
        mom.load(cwd / "outputs")


@pytest.mark.slow
def test_readme_shell_lines_compose(cwd):
    from mom.cli import preflight
    from mom.prompts import take_prompt_args

    lines = [ln.split("  #")[0].strip() for b in _blocks("bash") for ln in b.splitlines()]
    found = subprocess.run(["bash", "-c", next(ln for ln in lines if ln.startswith("RUN=")) + '; echo "$RUN"'],
                           cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    assert found == "outputs/2026-11-29/10-00-00"
    tools = [shlex.split(ln.replace("$RUN", found)) for ln in lines if ln.startswith("python -m mom.")]
    hydra_tools = [t for t in tools if t[2] in ("mom.train", "mom.eval", "mom.generate", "mom.export", "mom.score")]
    assert {t[2] for t in hydra_tools} >= {"mom.train", "mom.eval", "mom.generate", "mom.export"}
    for argv in hydra_tools:
        overrides, prompts = take_prompt_args(argv[3:])
        assert preflight(argv[2].removeprefix("mom."), overrides) is None, argv
