"""One multi-process training job for tests/test_distributed.py, run on every rank by torchrun.

``python -m torch.distributed.run ... tests/dist_job.py OUT TRAINER_OVERRIDE...``: an uninterrupted run of 4 steps
(checkpoints at steps 2 and 4) into OUT/full, then a run resumed from its step-2 checkpoint into OUT/resumed (which
also writes model/), both through :func:`mom.train.train` in the same processes (one start for both: the tests stay
short). Rank 0 writes OUT/result.json with each run's final metrics.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.helpers.overrides import TINY_RUN, small_model_overrides


def overrides(run_dir: Path, trainer: list[str]) -> list[str]:
    return ["model=jamba_tiny", *small_model_overrides(), *TINY_RUN, *trainer, f"paths.run_dir={run_dir}",
            "callbacks.model_checkpoint.save_top_k=-1", "trainer.limit_val_batches=0", "final_validate=false"]


def main() -> None:
    out, trainer = Path(sys.argv[1]), sys.argv[2:]
    from mom.config import compose
    from mom.train import train

    rank = int(os.environ.get("RANK", "0"))
    full = train(compose("train", overrides(out / "full", trainer) + ["save_model=false"]))
    ckpt = out / "full" / "checkpoints" / "step0000002.ckpt"
    resumed = train(compose("train", overrides(out / "resumed", trainer) + [f"ckpt_path={ckpt}"]))
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"full": full, "resumed": resumed}, indent=1))


if __name__ == "__main__":
    main()
