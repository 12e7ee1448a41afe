"""The CUDA check behind ``scripts/gpu_check.sh``: everything a GPU machine should prove, in at most 10 minutes.

    bash scripts/gpu_check.sh [--layers 6] [--steps 50] [--out gpu_check] [--skip-install] [--dry-run]

1. prints the device (torch, CUDA, GPU name, memory);
2. installs the ``gpu`` extra (mamba-ssm, causal-conv1d) when ``nvcc`` exists, else says MoM's own scan is used,
   and prints which CUDA kernels are used (``mom.model.kernels.status()``);
3. runs the tests marked ``cuda`` (scan on CUDA vs the CPU reference, packed layers vs BitLinear, cached generation
   vs full recompute, one bf16-mixed training step), then times the scan's forms on the GPU
   (``scripts/bench_gpu_paths.py --cuda``: per step, log-depth, mamba-ssm's kernel when usable);
4. trains ``experiment=momv4`` shrunk to ``--layers`` layers (same widths, mixtures and precision; the embedded
   Shakespeare corpus and a 4096-token BPE, so no network is needed) for ``--steps`` steps in bf16-mixed and prints
   tokens/s, MFU and peak memory (mom.train's throughput summary);
5. decodes from the trained model and prints tokens/s.

``--dry-run`` prints the plan (the commands) and runs nothing: that, the argument handling and the momv4 shrink are
tested on CPU (tests/test_gpu_check.py). Each step has its own time limit; the figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = {"install": 240, "kernels": 30, "tests": 140, "scan": 40, "train": 180, "decode": 60}  # gpu_check.sh stops all at 600 s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="momv4 shrunk to this many layers (default 6: one "
                    "attention layer, three MoE layers, as momv4's first six)")
    ap.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check"), help="run folder (default ./gpu_check)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    ap.add_argument("--skip-install", action="store_true", help="do not install the gpu extra")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    args = ap.parse_args(argv)
    if args.layers < 1 or args.steps < 2 or args.new_tokens < 1:
        ap.error("--layers >= 1, --steps >= 2 and --new-tokens >= 1")
    return args


def train_overrides(layers: int, steps: int, run_dir: Path) -> list[str]:
    """``mom.train`` overrides: momv4 with ``layers`` layers for ``steps`` bf16-mixed steps, offline data."""
    return ["experiment=momv4", f"model.num_hidden_layers={layers}",
            "data=shakespeare", "data.tokenizer.name=null", "data.tokenizer.vocab_size=4096",
            "trainer.accelerator=gpu", "trainer.devices=1", "trainer.strategy=auto", "trainer.precision=bf16-mixed",
            f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=10",
            "trainer.enable_progress_bar=false", "scheduler.warmup_steps=5", "final_validate=false",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}", f"hydra.run.dir={run_dir}"]


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    py = sys.executable
    out = args.out.resolve()
    steps = []
    if not args.skip_install:
        steps.append(("install", [py, "-m", "pip", "install", "--no-build-isolation", "-e", f"{REPO}[gpu]"]))
    steps.append(("kernels", [py, "-c", "import mom.model.kernels as k; print(k.status())"]))
    steps.append(("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-rs", str(REPO / "tests")]))
    steps.append(("scan", [py, str(REPO / "scripts" / "bench_gpu_paths.py"), "--cuda", "--L", "2048"]))
    steps.append(("train", [py, "-m", "mom.train", *train_overrides(args.layers, args.steps, out / "train")]))
    steps.append(("decode", [py, str(Path(__file__).resolve()), "--decode", str(out / "train" / "model"),
                             str(args.new_tokens)]))
    return steps


def describe_device() -> bool:
    import torch

    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        return False
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}, "
          f"{torch.cuda.device_count()} visible, bf16: {torch.cuda.is_bf16_supported()}")
    return True


def decode(model_dir: str, new_tokens: int) -> None:
    """Greedy decoding from the trained model: prints prefill and decode tokens/s (batch 1)."""
    import torch

    from mom.model import MoMForCausalLM

    model = MoMForCausalLM.from_pretrained(model_dir).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda")
    stamps: list[float] = []

    def streamer(_tok: torch.Tensor) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.generate(ids, max_new_tokens=8)  # warm-up (allocations, kernels)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, streamer=streamer, eos_token_id=None)
    n = len(stamps)
    print(f"[gpu_check] decode: prefill {ids.shape[1] / (stamps[0] - t0):,.0f} tokens/s, "
          f"decode {(n - 1) / (stamps[-1] - stamps[0]):,.1f} tokens/s (batch 1, {n} new tokens, bf16 autocast)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--decode"]:
        decode(argv[1], int(argv[2]))
        return 0
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        for name, cmd in steps:
            print(f"[{name}] {' '.join(cmd)}")
        return 0
    if not describe_device():
        print("error: no CUDA device: scripts/gpu_check.sh is for a GPU machine (--dry-run prints its plan)",
              file=sys.stderr)
        return 1
    # MAMBA_KEEP_CUDA_BUILD: mamba-ssm's git main builds its selective-scan extension only on request
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MAMBA_KEEP_CUDA_BUILD="TRUE")
    failed = []
    for name, cmd in steps:
        if name == "install" and shutil.which("nvcc") is None:
            print("[gpu_check] nvcc not found: the gpu extra (mamba-ssm, causal-conv1d) is not installed; "
                  "MoM's own scan and convolution run instead")
            continue
        print(f"\n[gpu_check] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, env=env, cwd=REPO, timeout=BUDGET_S[name], capture_output=name == "train",
                                 text=True)
        except subprocess.TimeoutExpired:
            print(f"[gpu_check] {name}: stopped after its {BUDGET_S[name]} s budget")
            failed.append(name)
            continue
        if name == "train":
            print(res.stdout[-3000:] if res.returncode else "\n".join(
                ln for ln in res.stdout.splitlines() if ln.startswith("[mom.train]")))
            if res.returncode:
                print(res.stderr[-3000:])
        print(f"[gpu_check] {name}: {'ok' if res.returncode == 0 else f'FAILED (exit {res.returncode})'} "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        if res.returncode:
            failed.append(name)
    print(f"\n[gpu_check] {'all steps passed' if not failed else 'failed: ' + ', '.join(failed)}; record the "
          "figures with the date and the device in docs/benchmarks.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

