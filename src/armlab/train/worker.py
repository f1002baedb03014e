"""Entry point of one training rank: `python -m armlab.train.worker <run dir>/plan.json`.

The built-in engine's rank, started by the supervisor, directly for one process or through torchrun for several. It joins
the process group (gloo on CPU, nccl on CUDA, with a finite timeout so a lost peer is an error,
not a hang), dies with its parent (so a killed supervisor never leaves orphan ranks holding
GPUs), and on any exception records a one-line error for the supervisor before exiting 1.
torchrun's agent then stops the other ranks at once. A stop signal (armlab.train.stop) is only
recorded: the loop finishes its step, checkpoints and returns, and the rank exits 0.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

from armlab.runs import RankError, die_with_parent, write_rank_error
from armlab.train.stop import StopFlag

DIST_TIMEOUT_S = int(os.environ.get("ARMLAB_DIST_TIMEOUT_S", "600"))


def main(plan_path: str) -> int:
    die_with_parent()
    stop = StopFlag().install()  # before the slow imports: a signal during start-up is a stop too
    rank = int(os.environ.get("RANK", "0"))
    try:
        import torch
        import torch.distributed as dist

        from armlab.train.loop import Dist, train_loop
        from armlab.train.plan import RunPlan

        plan = RunPlan.read(plan_path)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if plan.device == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if world_size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timedelta(seconds=DIST_TIMEOUT_S), **kwargs)
        try:
            train_loop(plan, Dist(rank, world_size, device, local_rank), stop)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0
    except BaseException as e:  # noqa: BLE001  every failure is reported to the supervisor
        from armlab.errors import ArmlabError

        kind = "bad_input" if isinstance(e, ArmlabError) else "error"
        text = str(e) if kind == "bad_input" else f"{type(e).__name__}: {e}"
        line = text.splitlines()[0] if str(e) else type(e).__name__
        write_rank_error(
            Path(plan_path).parent, RankError(rank, kind, line, time.time(), traceback.format_exc())
        )
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
