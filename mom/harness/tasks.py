"""Offline harness tasks built from the embedded corpus (the validation plays of ``data=shakespeare``).

Made on first use under ``$MOM_CACHE_DIR/harness/`` (default ``~/.cache/mom/harness/``) as harness YAML
tasks with local JSON-lines data files, in a folder named after a hash of the plays and of the settings
below, so a change of either builds a new folder and a finished folder is never rewritten (it is built in
a temporary folder, then renamed). The folder is what the harness's ``include_path`` points at.

``shakespeare_next_line`` (multiple choice, ``acc`` and ``acc_norm``)
    In each validation play, evenly spaced lines of speech (at least four words, not a speaker's name, a
    heading or an entrance/exit) are questions: the context is the text of the :data:`CONTEXT_LINES` lines
    before (speaker names and blank lines included, ending with a newline), the answer the true line, the
    three distractors other lines of speech of the same play (never one within the context window), the
    answer's position drawn at random. Chance is 0.25. :data:`QUESTIONS_PER_PLAY` per play.
``shakespeare_ppl`` (rolling log-likelihood: ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``)
    One document per validation play, its whole text, scored in windows of the model's context.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mom.data.corpus import stable_hash
from mom.files import replace_dir

OFFLINE_TASKS = ("shakespeare_next_line", "shakespeare_ppl")
BUILD_VERSION = 1  # bump when what the builders write changes
CONTEXT_LINES = 8
QUESTIONS_PER_PLAY = 200
CHOICES = 4
SEED = 0

_NOT_SPEECH = ("Enter", "Exit", "Exeunt", "Re-enter", "ACT", "SCENE", "EPILOGUE", "PROLOGUE")


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("MOM_CACHE_DIR") or "~/.cache/mom")) / "harness"


def is_speech(line: str) -> bool:
    """A line someone speaks: four words or more, not all capitals (names, headings), not a stage entrance."""
    words = line.split()
    return len(words) >= 4 and not line.isupper() and not line.startswith(_NOT_SPEECH)


def next_line_questions(play: str, text: str, n: int = QUESTIONS_PER_PLAY, seed: int = SEED) -> list[dict[str, Any]]:
    """Up to ``n`` multiple-choice questions from one play (see the module doc)."""
    lines = text.split("\n")
    speech = [i for i, ln in enumerate(lines) if is_speech(ln)]
    answers = [i for i in speech if i >= CONTEXT_LINES]
    rng = random.Random(f"{seed}:{play}")
    questions = []
    for k in range(min(n, len(answers))):
        i = answers[k * len(answers) // min(n, len(answers))]
        truth = lines[i]
        near = {lines[j] for j in range(i - CONTEXT_LINES, i + CONTEXT_LINES + 1) if 0 <= j < len(lines)}
        pool = sorted({lines[j] for j in speech} - near - {truth})
        if len(pool) < CHOICES - 1:
            break
        choices = rng.sample(pool, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, truth)
        questions.append({"play": play, "line": i, "context": "\n".join(lines[i - CONTEXT_LINES : i]) + "\n",
                          "choices": choices, "label": label})
    return questions


def _task_yaml(name: str, data_file: Path, hf_cache: Path, body: str) -> str:
    # JSON strings are valid YAML scalars: paths with any character stay exact
    return (f"task: {name}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            f"  data_files: {{test: {json.dumps(str(data_file))}}}\n"
            f"  cache_dir: {json.dumps(str(hf_cache))}\n"
            "test_split: test\n"
            + body +
            "metadata:\n"
            f"  version: {BUILD_VERSION}.0\n")


NEXT_LINE_BODY = """\
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

PPL_BODY = """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def offline_task_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of the offline tasks, built if missing (see the module doc)."""
    from mom.data.plays import Plays

    plays_source = Plays()
    settings = {"build": BUILD_VERSION, "context_lines": CONTEXT_LINES, "questions": QUESTIONS_PER_PLAY,
                "choices": CHOICES, "seed": SEED}
    root = Path(root) if root is not None else cache_root()
    final = root / f"tasks-{stable_hash({'corpus': plays_source.identity(), 'settings': settings})[:16]}"
    if (final / "shakespeare_ppl.yaml").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tasks-", dir=root))
    try:
        plays = list(zip(plays_source.names("validation"), plays_source.validation(), strict=True))
        _write_jsonl(tmp / "shakespeare_ppl.jsonl", [{"play": p, "text": t} for p, t in plays])
        _write_jsonl(tmp / "shakespeare_next_line.jsonl", [q for p, t in plays for q in next_line_questions(p, t)])
        hf_cache = final / "hf_cache"
        for name, body in (("shakespeare_next_line", NEXT_LINE_BODY), ("shakespeare_ppl", PPL_BODY)):
            # the data files are named at their final place: the folder is renamed there when complete
            (tmp / f"{name}.yaml").write_text(_task_yaml(name, final / f"{name}.jsonl", hf_cache, body), encoding="utf-8")
        replace_dir(tmp, final)  # a concurrent builder wrote the same files: replacing them changes nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
