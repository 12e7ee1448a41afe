"""Export a trained model: ``python -m mom.export run_dir=DIR format=packed``.

``format=packed`` writes ``DIR/model-packed/`` with the layout of ``DIR/model/`` (config.json,
model.safetensors, tokenizer.json): every ternary (BitLinear) layer is replaced by
``mom.model.packed.PackedTernaryLinear`` (2 bits per weight plus its scale; the SubLN gain and bias stay as
they are) by ``pack_model``, then ``save_pretrained``; the high-precision parts are stored unchanged.
``MoMForCausalLM.from_pretrained`` rebuilds the packed layers, so the folder works as ``model_dir=`` for
``mom.eval`` and ``mom.generate`` and its ternary layers run the low-bit kernel path. The packed model computes
what the ternary model computes (greedy output identical; tests/test_export.py).

The folder is written to a temporary sibling and renamed into place, so a reader never sees half of it (an
existing export is replaced). Prints the bytes of the ternary part before (as stored, and as bf16) and after.
:func:`export` is the job as a plain function.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from mom.cli import one_line_errors
from mom.config import CONF_DIR, ExportConfig, plain_options, register_configs
from mom.errors import MoMError
from mom.files import replace_dir
from mom.run_folder import resolve_model_dir, setup_stderr_logging

log = logging.getLogger("mom.export")
register_configs()

FORMATS = ("packed",)


class ExportError(MoMError, ValueError):
    """A bad export request: one line for the user."""


def safetensors_sizes(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) from a safetensors file's header (no tensor is read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["shape"], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def ternary_part_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes of the ternary layers' weights in a model folder's safetensors file.

    For an unpacked folder: the latent weights of every BitLinear as stored (``stored``), what they take in
    bf16 (``bf16``) and the weight count. For a packed folder: every tensor of a packed layer except its
    SubLN gain and bias (``stored``: packed codes + scales). ``layers``: the number of ternary layers.
    """
    from mom.model import MoMConfig
    from mom.model.model import component_of
    from mom.model.packed import packed_module_names

    sizes = safetensors_sizes(model_dir / "model.safetensors")
    packed = packed_module_names(sizes)
    if packed:
        prefixes = tuple(f"{p}." for p in packed)
        stored = sum(b for k, (_, _, b) in sizes.items()
                     if k.startswith(prefixes) and not (k.endswith(".bias") or ".norm." in k))
        return {"layers": len(packed), "stored": stored}
    config = MoMConfig.load(model_dir / "config.json")
    n_weights = stored = layers = 0
    for k, (_, shape, b) in sizes.items():
        # a BitLinear is a linear whose ``<name>.norm.weight`` (SubLN gain) sits beside its weight
        if not k.endswith(".weight") or f"{k[:-len('.weight')]}.norm.weight" not in sizes:
            continue
        comp = component_of(k[:-len(".weight")])
        if comp is None or config.precision.get(comp) != "ternary":
            continue
        numel = 1
        for d in shape:
            numel *= d
        n_weights += numel
        stored += b
        layers += 1
    return {"layers": layers, "stored": stored, "bf16": 2 * n_weights, "weights": n_weights}


def _default_output(cfg: dict[str, Any], model_dir: Path, fmt: str) -> Path:
    if cfg.get("output_dir"):
        return Path(str(cfg["output_dir"])).expanduser()
    if cfg.get("run_dir") and not cfg.get("model_dir"):
        return Path(str(cfg["run_dir"])).expanduser() / f"model-{fmt}"
    return model_dir.parent / f"{model_dir.name}-{fmt}"


@torch.no_grad()
def export(cfg: Any, out=None) -> dict[str, Any]:
    """Export the model of ``cfg`` (an export config); returns {"output_dir", sizes...}. Writes a size table
    to ``out`` when given."""
    from mom.model import MoMForCausalLM
    from mom.model.bitlinear import BitLinear
    from mom.model.packed import pack_model

    cfg = plain_options(cfg, ExportConfig)
    fmt = str(cfg["format"])
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    model_dir = resolve_model_dir(cfg.get("run_dir"), cfg.get("model_dir"), error=ExportError)
    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir / 'tokenizer.json'} is missing: the model folder must hold its tokenizer")
    target = _default_output(cfg, model_dir, fmt)
    if target.resolve() == model_dir.resolve():
        raise ExportError(f"output_dir {target} is the model folder itself")

    model = MoMForCausalLM.from_pretrained(model_dir).eval()
    n_ternary = sum(isinstance(m, BitLinear) for m in model.modules())
    if n_ternary == 0:
        raise ExportError(f"{model_dir} has no ternary (BitLinear) layer to pack (precision: "
                          f"{model.config.precision}); nothing to export")
    before = ternary_part_bytes(model_dir)
    pack_model(model)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        shutil.copy2(model_dir / "tokenizer.json", tmp / "tokenizer.json")
        after = ternary_part_bytes(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total_before = (model_dir / "model.safetensors").stat().st_size
    total_after = (target / "model.safetensors").stat().st_size
    result = {
        "output_dir": str(target),
        "format": fmt,
        "ternary_layers": before["layers"],
        "ternary_weights": before["weights"],
        "ternary_bytes_stored_before": before["stored"],
        "ternary_bytes_bf16": before["bf16"],
        "ternary_bytes_packed": after["stored"],
        "ratio_vs_bf16": before["bf16"] / max(after["stored"], 1),
        "file_bytes_before": total_before,
        "file_bytes_after": total_after,
    }
    if out is not None:
        rows = [
            ("ternary layers", f"{before['layers']}", ""),
            ("ternary weights", f"{before['weights']:,}", ""),
            ("ternary part, as stored before", f"{before['stored']:,} B", f"{8 * before['stored'] / before['weights']:.2f} bits/w"),
            ("ternary part, as bf16", f"{before['bf16']:,} B", "16.00 bits/w"),
            ("ternary part, packed", f"{after['stored']:,} B", f"{8 * after['stored'] / before['weights']:.2f} bits/w"),
            ("model.safetensors", f"{total_before:,} B -> {total_after:,} B", ""),
        ]
        out.write(f"packed {model_dir} -> {target}\n")
        out.write("| part | bytes | |\n|---|---:|---:|\n")
        for r in rows:
            out.write(f"| {r[0]} | {r[1]} | {r[2]} |\n")
        out.write(f"ternary part: {result['ratio_vs_bf16']:.2f}x smaller than bf16\n")
        out.flush()
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    setup_stderr_logging()
    with one_line_errors():
        export(cfg, out=sys.stdout)


if __name__ == "__main__":
    from mom.cli import run_cli

    run_cli(main, "export")  # a config that does not compose: one line too
