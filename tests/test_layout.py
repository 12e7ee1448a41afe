"""Where the glue lives: one home per helper, no import cycles, each layer importing only the layers below it.

Read from the source with ``ast`` (lazy imports inside functions count too); nothing heavy is imported.
"""

from __future__ import annotations

import ast
import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import REPO
from tests.helpers.imports import cycles, imported_names, modules, parse, project_graph
from tests.helpers.markers import subprocess_tests

MODULES = modules()
KNOWN_CYCLES: list[list[str]] = []


def _defs(name: str) -> list[str]:
    """Modules that define a top-level function or class called ``name``."""
    out = []
    for mod, path in MODULES.items():
        if any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name for n in parse(path).body):
            out.append(mod)
    return out


def _calls(mod: str, attr: str) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == attr and isinstance(n.value, ast.Name)
               and n.value.id == "os" for n in ast.walk(parse(MODULES[mod])))


def test_no_module_named_utils():
    assert not [m for m in MODULES if m.rpartition(".")[2] in ("utils", "util", "helpers", "misc", "common")]


def test_no_import_cycles():
    assert [c for c in cycles(project_graph()) if c not in KNOWN_CYCLES] == []


def test_model_package_imports_nothing_from_the_hydra_lightning_layer():
    # mom.infer is plain PyTorch too: model.generate delegates decoding to the engine (a lazy import)
    allowed = ("mom.model", "mom.infer", "mom.errors", "mom.files")
    forbidden_libs = ("hydra", "omegaconf", "lightning", "torchmetrics", "wandb")
    for mod in (m for m in MODULES if m == "mom.model" or m.startswith("mom.model.")):
        names = imported_names(MODULES[mod])
        ours = {n for n in names if n == "mom" or n.startswith("mom.")}
        assert all(n.startswith(allowed) for n in ours), (mod, sorted(ours))
        assert not [n for n in names if n.split(".")[0] in forbidden_libs], (mod, sorted(names))


def test_errors_and_files_import_nothing_from_the_project():
    for mod in ("mom.errors", "mom.files"):
        assert not [n for n in imported_names(MODULES[mod]) if n.split(".")[0] == "mom"], mod


def test_data_package_imports_neither_slm_nor_the_training_layer():
    for mod in (m for m in MODULES if m.startswith("mom.data")):
        bad = [n for n in imported_names(MODULES[mod]) if n in ("mom.slm", "mom.lit", "mom.train", "mom.callbacks")]
        assert not bad, (mod, bad)


@pytest.mark.parametrize("name,home", [
    ("atomic_write", "mom.files"), ("resolve_model_dir", "mom.run_folder"),
    ("load_model_and_tokenizer", "mom.run_folder"), ("setup_stderr_logging", "mom.run_folder"),
    ("model_identity", "mom.run_folder"), ("fail", "mom.cli"), ("one_line_errors", "mom.cli"),
    ("MoMError", "mom.errors"), ("LanguageModelMetrics", "mom.metrics"), ("Rho1Selection", "mom.slm"),
    ("RefLosses", "mom.data.ref_losses"), ("compose", "mom.config"),
])
def test_each_helper_exists_once(name, home):
    assert _defs(name) == [home]
    assert not _defs(f"_{name}")  # no private copy either


def test_files_are_renamed_into_place_only_by_mom_files():
    assert [m for m in MODULES if _calls(m, "replace") or _calls(m, "rename")] == ["mom.files"]


def test_every_error_class_is_a_mom_error():
    bases = {n.name: {ast.unparse(b).rpartition(".")[2] for b in n.bases}
             for path in MODULES.values() for n in parse(path).body if isinstance(n, ast.ClassDef)}
    errors = [name for name in bases if name.endswith("Error")]

    def is_mom_error(name: str, seen: frozenset = frozenset()) -> bool:
        return name == "MoMError" or any(b in bases and b not in seen and is_mom_error(b, seen | {name})
                                         for b in bases.get(name, ()))

    assert errors and not [e for e in errors if not is_mom_error(e)]


@pytest.mark.parametrize("tool", ["mom.train", "mom.eval", "mom.generate", "mom.export", "mom.score"])
def test_entry_points_report_errors_through_the_one_wrapper(tool):
    main = next(n for n in parse(MODULES[tool]).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    src = ast.unparse(main)
    assert "one_line_errors()" in src
    assert not [h for n in ast.walk(main) if isinstance(n, ast.Try) for h in n.handlers], src  # no except of its own
    assert "run_cli(main" in MODULES[tool].read_text()


def test_yaml_repeats_no_schema_default():
    """Each default is written once, in the schema dataclass; a YAML sets only what differs from it."""
    import mom.config as C

    typed = {"optimizer": C.OptimizerSchema, "scheduler": C.SchedulerSchema, "trainer": C.TrainerSchema,
             "slm": C.SlmSchema, "harness": C.HarnessSchema}
    files = [(p, cls) for g, cls in typed.items() for p in sorted((C.CONF_DIR / g).glob("*.yaml"))]
    files += [(C.CONF_DIR / f"{n}.yaml", cls) for n, cls in (("train", C.TrainConfig), ("eval", C.EvalConfig),
              ("generate", C.GenerateConfig), ("export", C.ExportConfig), ("score", C.ScoreConfig))]
    for path, cls in files:
        raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
        defaults = C.schema_defaults(cls)
        assert not [k for k, v in raw.items() if k in defaults and defaults[k] == v], path
    # the presets are registered from mom.model.config.PRECISION_PRESETS: no YAML copy of one
    assert not [p for p in C.PRECISION_PRESETS if (C.CONF_DIR / "precision" / f"{p}.yaml").exists()]


def test_nothing_points_at_shared():
    texts = [p for d in ("conf", "docs", "scripts", "mom") for p in (REPO / d).rglob("*") if p.is_file()
             and p.suffix in (".py", ".yaml", ".md")] + [REPO / "README.md", REPO / "Makefile"]
    assert not [p for p in texts if "shared/" in p.read_text(errors="replace")]


def test_tests_do_not_import_each_other():
    for path in sorted((REPO / "tests").glob("test_*.py")):
        names = imported_names(path)
        assert not [n for n in names if n.startswith(("tests.test_", "tests.conftest"))], path.name


def test_every_subprocess_test_is_marked_slow():
    found = subprocess_tests()
    assert found and all(found.values()), [k for k, slow in found.items() if not slow]


def test_language_model_metrics_sum_exactly():
    from mom.metrics import LanguageModelMetrics

    g = torch.Generator().manual_seed(0)
    m = LanguageModelMetrics()
    nll_total, tokens, nbytes = 0.0, 0, 0
    token_bytes = torch.tensor([1, 2, 3, 4, 1])
    for _ in range(3):
        labels = torch.randint(0, 5, (2, 6), generator=g)
        labels[0, 2] = -100
        token_loss = torch.rand(2, 5, generator=g)
        m.update(token_loss, labels, token_bytes)
        valid = labels[:, 1:] != -100
        nll_total += float(token_loss[valid].double().sum())
        tokens += int(valid.sum())
        nbytes += int(token_bytes[labels[:, 1:][valid]].sum())
    r = m.compute()
    assert int(r["tokens"]) == tokens and int(r["bytes"]) == nbytes
    assert float(r["loss"]) == pytest.approx(nll_total / tokens, rel=1e-12)
    assert float(r["bpb"]) == pytest.approx(nll_total / (math.log(2) * nbytes), rel=1e-12)
    assert math.isnan(float(LanguageModelMetrics().compute()["loss"]))
