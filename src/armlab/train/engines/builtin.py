"""The built-in engine: armlab's own trainer (armlab.train.worker + loop), behind the engine seam.

Its recipe is the spec itself ([model], [train]), so `configure` resolves nothing more and the
run fingerprints as its spec. Ranks run `python -m armlab.train.worker <run dir>/plan.json` with
the interpreter running armlab (directly for one rank, under torchrun for several). Rank 0 writes
metrics.jsonl and state.json itself, so `on_output` has nothing to do. Checkpoints are
armlab.train.checkpoint's; evaluation is armlab's own bpb and CORE on the loaded model.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from armlab.errors import ArmlabError
from armlab.train.engines import BaseEngine, Command, EngineConfig, rank_env, torchrun_argv

if TYPE_CHECKING:
    import torch

    from armlab.budget import Budget
    from armlab.spec import Experiment
    from armlab.train.compiling import CompileChoice
    from armlab.train.plan import RunPlan


@dataclass(frozen=True)
class BuiltinConfig(EngineConfig):
    engine: str = "builtin"


class BuiltinEngine(BaseEngine):
    stops_with_checkpoint = True  # armlab.train.stop: the ranks agree, checkpoint and exit

    def configure(self, exp: Experiment) -> BuiltinConfig:
        return BuiltinConfig()

    def load_config(self, data: Mapping[str, Any]) -> BuiltinConfig:
        return BuiltinConfig(**data)

    def budget(self, exp: Experiment, vocab_size: int) -> Budget:
        from armlab.budget import training_budget

        return training_budget(exp, vocab_size=vocab_size)

    def checkpoint_steps(self, run_dir: Path) -> list[int]:
        from armlab.train.checkpoint import list_steps

        return list_steps(run_dir)

    def preflight(self, plan: RunPlan) -> None:
        if plan.experiment.train.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ArmlabError(
                "train.wandb_project is set but wandb is not installed: pip install 'armlab[wandb]'"
            )

    def compile_choice(
        self, exp: Experiment, device: str, budget: Budget, world_size: int, ranks_per_node: int
    ) -> CompileChoice:
        """Always on CUDA; on CPU when the planned steps repay the compile (armlab.train.compiling)."""
        import os

        from armlab.budget import model_dim
        from armlab.train import compiling
        from armlab.train.engines import cpu_cores

        probe = None
        if device == "cpu" and exp.train.compile:
            threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, cpu_cores() // ranks_per_node)
            rows = min(exp.model.max_seq_len * exp.train.device_batch_size, 4096)
            probe = compiling.cpu_matmul_flops(model_dim(exp.model), rows, threads)
        per_rank = budget.flops_per_token * budget.total_batch_size / world_size
        return compiling.choose(exp.train.compile, device, budget.num_iterations, per_rank, exp.model.depth, probe)

    def command(self, plan: RunPlan) -> Command:
        worker = ["-m", "armlab.train.worker", str(plan.plan_file)]
        argv = torchrun_argv(
            sys.executable, worker, plan.nproc_per_node, plan.master_port, plan.nnodes, plan.node_rank,
            plan.rdzv_endpoint,
        )  # fmt: skip
        return Command(argv, rank_env(plan.device, plan.nproc_per_node))

    def load_model(
        self, run_dir: Path, device: str | torch.device = "cpu", step: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        from armlab.train.checkpoint import load_model

        return load_model(run_dir, step, device=device)  # bf16 on CUDA like training, no autocast

    def weights_files(self, run_dir: Path, step: int) -> list[Path]:
        from armlab.runs import CHECKPOINTS  # torch-free: compare checks eval.json against it

        return [Path(run_dir) / CHECKPOINTS / f"step_{step:06d}" / "model.pt"]
