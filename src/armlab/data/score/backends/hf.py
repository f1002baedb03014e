"""`kind = "hf"`: a Hugging Face sequence classifier (`AutoModelForSequenceClassification`).

The score is the regression output when the model has one logit (FineWeb-Edu's classifier, a
regression head on snowflake-arctic-embed-m: `logits.squeeze(-1)`, as its model card computes
it), else the softmax probability of `label` (a name in the model's `id2label`).

Length-sorted batches: each block of up to SORT_DOCS documents is tokenized once (truncated at
`max_length`, no padding), sorted by token count (longest first, so a batch too large for the
device fails on the first batch), cut into batches of `batch_size`, each padded only to its own
longest document, and the scores are put back in document order. Padding is then a few percent
of the tokens instead of most of them on web text's long-tailed lengths (bench/score.py).

Devices: bf16 on CUDA, one worker per GPU of the host (each worker claims a GPU of its own, see
`claim_gpu`; under Ray each actor sees one GPU); fp32 on CPU, one single-threaded worker per
core. Every worker computes with the same thread count and the same batches (they depend only on
the unit's documents), so the scores are the same bytes for any number of workers on the same
kind of device. bf16 and fp32 scores differ in their last bits: the manifest records the dtype.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from armlab.data.score.backends import Hardware, cpu_count, nan_scores
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec, ScorerSpec

SORT_DOCS = 4096  # documents tokenized and length-sorted together (memory: their token ids)
PAD_MULTIPLE_CUDA = 8  # pad batches to a multiple of 8 tokens on CUDA (tensor-core shapes)


class HFBackend:
    kind = "hf"
    block_docs = SORT_DOCS

    def columns(self, scorer: ScorerSpec, pool: PoolSpec) -> list[str]:
        return [pool.text_column]

    def identity(self, scorer: ScorerSpec, pool: PoolSpec) -> dict[str, Any]:
        return {"label": scorer.label, "max_length": scorer.max_length, "text_column": pool.text_column}

    def devices(self, requested: str | None, cluster: Hardware | None = None) -> tuple[str, int]:
        wants_gpu = requested in (None, "cuda")
        gpus = (cluster.gpus if cluster else gpu_count()) if wants_gpu else 0
        if requested == "cuda" and not gpus:
            where = "in the Ray cluster" if cluster else "here (torch.cuda.device_count() is 0)"
            raise ArmlabError(f"--device cuda: no CUDA GPU {where}")
        return ("cuda", gpus) if gpus else ("cpu", cluster.cpus if cluster else cpu_count())

    def load(self, scorer: ScorerSpec, path: Path, device: str) -> HFModel:
        return HFModel(scorer, path, device)


@cache
def gpu_count() -> int:
    """CUDA GPUs visible here, counted in a child process: this one forks the workers, and a
    parent that initialised CUDA would leave them unable to use it."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


_claimed: list[Any] = []  # the open lock file of this process's GPU (held for its lifetime)


def claim_gpu(n: int) -> int:
    """This worker's GPU among `n`: the first whose lock file (per parent process, so per scoring
    run) no other worker holds. The kernel drops the lock when the worker exits."""
    import fcntl

    if n <= 1:
        return 0
    if _claimed:
        return int(_claimed[0][1])
    root = Path(tempfile.gettempdir()) / f"armlab-gpus-{os.getppid()}"
    root.mkdir(exist_ok=True)
    for i in range(n):
        f = open(root / f"{i}.lock", "w")  # noqa: SIM115 (held open: the lock is the claim)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _claimed.append((f, i))
        return i
    return os.getpid() % n  # more workers than GPUs: share


class HFModel:
    def __init__(self, scorer: ScorerSpec, path: Path, device: str):
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        transformers.logging.set_verbosity_error()  # no load-time chatter in every worker
        transformers.logging.disable_progress_bar()
        if device == "cpu":
            torch.set_num_threads(1)  # one core per worker: the same arithmetic for any worker count
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.device, dtype = torch.device("cpu"), torch.float32
        else:  # "cuda": a worker claims a GPU of its own; "cuda:N" (plan's probe): that one
            index = claim_gpu(torch.cuda.device_count()) if device == "cuda" else int(device.split(":")[1])
            self.device, dtype = torch.device("cuda", index), torch.bfloat16
            torch.cuda.set_device(self.device)
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
        except (OSError, ValueError) as e:
            raise ArmlabError(
                f"scorer {scorer.name!r}: {path} is not a sequence classifier saved with save_pretrained "
                f"({str(e).splitlines()[0][:200]})"
            ) from None
        self.model = model.to(self.device).eval()
        self.torch = torch
        cfg = model.config
        labels = {str(v): int(k) for k, v in (cfg.id2label or {}).items()}  # name -> output index
        if scorer.label is None:
            if cfg.num_labels != 1:
                raise ArmlabError(
                    f"scorer {scorer.name!r}: the model has {cfg.num_labels} labels, not one regression "
                    f"output; set label to one of {', '.join(labels)}"
                )
            self.label_index = None
        else:
            if scorer.label not in labels:
                raise ArmlabError(
                    f"scorer {scorer.name!r}: the model has no label {scorer.label!r} (labels: {', '.join(labels)})"
                )
            self.label_index = labels[scorer.label]
        # never past what the model can place: its positions, and its tokenizer's own limit
        # (RoBERTa-style models have 514 positions but take 512 tokens)
        limits = [getattr(cfg, "max_position_embeddings", None), getattr(self.tok, "model_max_length", None)]
        self.max_length = min([scorer.max_length] + [int(x) for x in limits if x and x < 1_000_000])
        self.batch_size = scorer.batch_size
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.pad_multiple = PAD_MULTIPLE_CUDA if self.device.type == "cuda" else 1

    def score(self, table: pa.Table) -> np.ndarray:
        texts = table.column(0).to_pylist()
        out = nan_scores(len(texts))
        rows = [i for i, t in enumerate(texts) if t is not None]
        for lo in range(0, len(rows), SORT_DOCS):
            block = rows[lo : lo + SORT_DOCS]
            ids = self.tok(
                [texts[i] for i in block], truncation=True, max_length=self.max_length, padding=False
            )["input_ids"]
            out[np.asarray(block, dtype=np.int64)] = self._sorted_batches(ids)
        return out

    def _sorted_batches(self, ids: list[list[int]]) -> np.ndarray:
        """Scores of tokenized documents, computed in length-sorted batches, in their own order."""
        torch = self.torch
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        scores = np.empty(len(ids), dtype=np.float32)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            width = min(-(-int(lengths[idx[0]]) // self.pad_multiple) * self.pad_multiple, self.max_length)
            batch = np.full((len(idx), max(width, 1)), self.pad_id, dtype=np.int64)
            mask = np.zeros_like(batch)
            for row, i in enumerate(idx):
                batch[row, : lengths[i]] = ids[i]
                mask[row, : lengths[i]] = 1
            with torch.inference_mode():
                logits = self.model(
                    input_ids=torch.from_numpy(batch).to(self.device),
                    attention_mask=torch.from_numpy(mask).to(self.device),
                ).logits.float()
                if self.label_index is None:
                    vals = logits[:, 0]
                else:
                    vals = torch.softmax(logits, dim=-1)[:, self.label_index]
            scores[idx] = vals.cpu().numpy()
        return scores


def release_claims(parent_pid: int) -> None:
    """Remove a finished run's GPU lock files (the workers that held them are gone)."""
    import shutil

    with contextlib.suppress(OSError):
        shutil.rmtree(Path(tempfile.gettempdir()) / f"armlab-gpus-{parent_pid}")
