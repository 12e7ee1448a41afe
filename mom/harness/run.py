"""Run harness tasks on a MoM model: the ``harness`` config group of ``mom.eval`` and of ``mom.train``'s ``eval``.

:func:`run_tasks` builds a :class:`~mom.harness.lm.MoMLM`, the task manager (the offline tasks of
:mod:`mom.harness.tasks` always included; the harness's own task catalogue only when a task is not one of
ours, since indexing it takes tens of seconds) and calls ``lm_eval.simple_evaluate``. It returns the
harness's results and :func:`summarize` turns them into ``{task: {metric: value}}`` (the harness's
``acc,none`` keys become ``acc``; a metric of another filter keeps its ``,filter`` suffix), the JSON line
that ``mom.eval`` prints last. :func:`save_results` merges that into ``<run>/harness/<model folder>.json``
(one entry per task, replaced when the task runs again) and :func:`log_results` sends it to Lightning
loggers as ``harness/<task>/<metric>``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from mom.files import atomic_write
from mom.harness import HarnessError

log = logging.getLogger("mom.harness")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise HarnessError("lm-evaluation-harness is not installed: pip install -e '.[eval]'") from None


def harness_options(node: Any) -> dict[str, Any]:
    """A ``harness`` node (DictConfig, dict, ``HarnessSchema`` or None) as a plain dict with every key of
    :class:`~mom.config.HarnessSchema` (its default where the node has none); ``tasks`` as a list of names."""
    import dataclasses

    from mom.config import HarnessSchema, schema_defaults, to_plain

    out = schema_defaults(HarnessSchema)
    node = dataclasses.asdict(node) if dataclasses.is_dataclass(node) else to_plain(node)
    out.update({k: v for k, v in (node or {}).items() if k in out})
    out["tasks"] = task_list(out["tasks"])
    return out


def task_list(tasks: Any) -> list[str]:
    """``harness.tasks`` as a list of names (a list, or one comma-separated string)."""
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    return [str(t).strip() for t in tasks if str(t).strip()]


def task_manager(tasks: list[str], include_path: Any = None):
    """A harness TaskManager that knows the offline tasks (and the harness's catalogue if needed)."""
    from lm_eval.tasks import TaskManager

    from mom.harness.tasks import OFFLINE_TASKS, offline_task_dir

    paths = [str(offline_task_dir())] + [p for p in str(include_path or "").split(os.pathsep) if p]
    defaults = any(t not in OFFLINE_TASKS for t in tasks)
    tm = TaskManager(include_path=paths, include_defaults=defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise HarnessError(f"unknown harness task(s): {', '.join(unknown)} (offline: {', '.join(OFFLINE_TASKS)}; "
                           "others are the harness's own, listed by `lm_eval ls tasks`)")
    return tm


def _int_if_whole(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x >= 1 and x.is_integer() else x


def run_tasks(cfg: dict[str, Any], *, model_dir: Path | None = None, model: Any = None, tokenizer: Any = None,
              device: str | None = None) -> dict[str, Any]:
    """Evaluate the model of ``model_dir`` (or the loaded ``model``/``tokenizer``) on ``cfg["tasks"]``.

    ``cfg`` is a ``harness`` config node as a dict (tasks, num_fewshot, limit, batch_size, ...). Returns the
    harness's results dict (``results``, ``versions``, ``n-shot``, ``config``, ...).
    """
    require_lm_eval()
    import lm_eval

    from mom.harness.lm import MoMLM

    cfg = harness_options(cfg)
    tasks = cfg["tasks"]
    if not tasks:
        raise HarnessError("harness.tasks is empty: name at least one task, e.g. harness.tasks=[shakespeare_ppl]")
    tm = task_manager(tasks, cfg["include_path"])
    lm = MoMLM(model_dir=str(model_dir) if model is None else None, model=model, tokenizer=tokenizer,
               batch_size=int(cfg["batch_size"]), max_length=cfg["max_length"], max_gen_toks=int(cfg["max_gen_toks"]),
               device=cfg["device"] or device, dtype=str(cfg["dtype"]), seed=int(cfg["seed"]))
    seed = int(cfg["seed"])
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=tm, num_fewshot=cfg["num_fewshot"],
            limit=_int_if_whole(cfg["limit"]), bootstrap_iters=int(cfg["bootstrap_iters"]),
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:  # a Hub task without network: one line that says so
        from mom.cli import one_line
        from mom.harness.tasks import OFFLINE_TASKS

        raise HarnessError(f"a task's dataset could not be loaded: {one_line(e)[:300]} (Hub tasks need the "
                           f"network; {', '.join(OFFLINE_TASKS)} do not)") from None
    if results is None:  # another rank of a distributed run
        return {}
    results["mom"] = {"model_dir": str(lm.model_dir) if lm.model_dir else None, "max_length": lm.max_length,
                      "lm_eval": lm_eval.__version__}
    return results


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's results (numbers only; ``,none`` dropped)."""
    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            row = {}
            for key, value in metrics.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool) or key in ("sample_len",):
                    continue
                name, _, filt = key.partition(",")
                row[name if filt in ("", "none") else key] = float(value)
            out.setdefault(task, {}).update(row)
    return out


def tables(results: dict[str, Any]) -> str:
    """The harness's own results table (and its groups table when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def run_folder_of(run_dir: Any, model_dir: Path) -> Path | None:
    """The training run a result belongs to: ``run_dir``, else the model folder's parent if it is a run."""
    if run_dir:
        return Path(str(run_dir)).expanduser()
    parent = Path(model_dir).resolve().parent
    return parent if (parent / ".hydra").is_dir() or (parent / "model").is_dir() else None


def save_results(run: Path, model_dir: Path, results: dict[str, Any]) -> Path:
    """Merge these results into ``<run>/harness/<model folder name>.json`` (atomically); returns its path."""
    path = run / "harness" / f"{Path(model_dir).name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        saved = {}
    saved.setdefault("tasks", {})
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    limit = (results.get("config") or {}).get("limit")
    for task, metrics in summarize(results).items():
        saved["tasks"][task] = {"metrics": metrics, "n-shot": (results.get("n-shot") or {}).get(task),
                                "n-samples": (results.get("n-samples") or {}).get(task), "limit": limit,
                                "version": (results.get("versions") or {}).get(task), "date": when}
    saved.update({"model_dir": str(model_dir), **{k: v for k, v in (results.get("mom") or {}).items()
                                                 if k != "model_dir"}})
    return atomic_write(path, lambda f: f.write(json.dumps(saved, indent=2, sort_keys=True) + "\n"), mode="w")


def log_results(loggers: list[Any], summary: dict[str, dict[str, float]], step: int | None = None) -> None:
    """``harness/<task>/<metric>`` to every Lightning logger (wandb, CSV, TensorBoard)."""
    flat = {f"harness/{task}/{name}": value for task, metrics in summary.items() for name, value in metrics.items()
            if math.isfinite(value)}
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        logger.save()


def evaluate(cfg: dict[str, Any], out: Any = None) -> dict[str, dict[str, float]]:
    """``mom.eval`` with ``harness.tasks``: the model of ``run_dir``/``model_dir`` on those tasks.

    Writes the harness's table and then the summary as one JSON line to ``out`` (a text stream) when given,
    merges the results into the run folder (:func:`save_results`) and returns the summary.
    """
    from mom.run_folder import resolve_model_dir

    model_dir = resolve_model_dir(cfg.get("run_dir"), cfg.get("model_dir"), error=HarnessError)
    results = run_tasks(cfg.get("harness"), model_dir=model_dir)
    summary = summarize(results)
    run = run_folder_of(cfg.get("run_dir"), model_dir)
    if run is not None:
        log.info("harness results merged into %s", save_results(run, model_dir, results))
    if out is not None:
        out.write(tables(results) + "\n")
        out.write(json.dumps(summary) + "\n")
        out.flush()
    return summary


def after_training(cfg: dict[str, Any], run_dir: Path, trainer: Any) -> dict[str, float]:
    """``eval.harness`` of ``mom.train``: the saved ``<run>/model`` on the tasks, on rank 0 only.

    The results go to ``<run>/harness/model.json`` and to the trainer's loggers (``harness/<task>/<metric>``
    at the last step). Returns them flat for the run's final metrics. A failure here is logged, not raised:
    the trained model is saved and ``mom.eval`` can run the tasks again.
    """
    if not trainer.is_global_zero:
        return {}
    model_dir = run_dir / "model"
    tasks = harness_options(cfg)["tasks"]
    try:
        if not (model_dir / "model.safetensors").is_file():
            raise HarnessError(f"{model_dir} was not written (save_model=false?)")
        results = run_tasks(cfg, model_dir=model_dir, device=str(trainer.strategy.root_device))
    except HarnessError as e:
        log.error("eval.harness failed: %s. The model is saved; rerun with: python -m mom.eval run_dir=%s "
                  "\"harness.tasks=[%s]\"", e, run_dir, ",".join(tasks))
        return {}
    summary = summarize(results)
    log.info("harness results merged into %s", save_results(run_dir, model_dir, results))
    log.info("harness:\n%s", tables(results))
    log_results(trainer.loggers, summary, step=trainer.global_step)
    return {f"harness/{task}/{name}": v for task, metrics in summary.items() for name, v in metrics.items()}
