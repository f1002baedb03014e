"""`kind = "head"`: a linear layer or a small MLP over an embedding column already in the pool
(fineweb-edu-fortified ships a 768-float `embedding` per document). No GPU, and no text read:
a unit reads the id column and the embedding column only (column-pruned), so scoring a pool
costs about what reading its embeddings costs (bench/score.py).

The head file (`model`: a path or URL; .safetensors or .npz) holds float tensors:
- a linear head: `weight` [k, d] (or [d]) and optionally `bias` [k], as `torch.nn.Linear` saves them;
- an MLP: `<i>.weight` / `<i>.bias` per layer, in the order of the integer i, with any common
  prefix (a `torch.nn.Sequential(Linear, ReLU, Linear)` saves `0.weight, 0.bias, 2.weight, ...`);
  `activation` (relu, gelu, tanh) is applied between layers.
With one output (k = 1) the score is that output; with k > 1 it is the softmax probability of
`label`: an output index, or a name listed in the file (safetensors metadata `labels` as a JSON
list, or an npz array `labels`). The first layer runs on the float32 embeddings as read, the
rest in float64; scores are stored as float32. A null
embedding has no score (NaN); one of the wrong length is refused, naming the file and row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from armlab.data.score.backends import Hardware, cpu_count, nan_scores
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec, ScorerSpec

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    # the tanh form torch's GELU(approximate="tanh") computes; exact erf GELU needs scipy per row
    "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3))),
}


class HeadBackend:
    kind = "head"
    block_docs = 0

    def columns(self, scorer: ScorerSpec, pool: PoolSpec) -> list[str]:
        assert scorer.column is not None
        return [scorer.column]

    def identity(self, scorer: ScorerSpec, pool: PoolSpec) -> dict[str, Any]:
        return {"label": scorer.label, "column": scorer.column, "activation": scorer.activation}

    def devices(self, requested: str | None, cluster: Hardware | None = None) -> tuple[str, int]:
        if requested == "cuda":
            raise ArmlabError(
                "head scorers run on CPU (reading the embeddings is the work); drop --device cuda"
            )
        return "cpu", cluster.cpus if cluster else cpu_count()

    def load(self, scorer: ScorerSpec, path: Path, device: str) -> HeadModel:
        return HeadModel(scorer, path)


def read_head(path: Path, who: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The file's tensors (float64) and its label names, if it lists any."""
    from safetensors import SafetensorError

    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"  # an .npz is a zip, whatever its name
    try:
        if path.suffix == ".npz" or zipped:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            labels = [str(x) for x in arrays.pop("labels", np.array([], dtype=str)).tolist()]
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
                meta = f.metadata() or {}
            labels = [str(x) for x in json.loads(meta.get("labels", "[]"))]
    except (OSError, ValueError, SafetensorError) as e:
        raise ArmlabError(f"{who}: {path} is not a .safetensors or .npz head ({str(e)[:200]})") from None
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}, labels


def head_layers(arrays: dict[str, np.ndarray], who: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], bias [out]) per layer, in order (see the module doc for the names)."""
    prefixes = [k[: -len("weight")] for k in arrays if k == "weight" or k.endswith(".weight")]
    if not prefixes:
        raise ArmlabError(f"{who}: the head file has no 'weight' tensor (tensors: {', '.join(arrays)})")

    def index(prefix: str) -> int:
        found = re.findall(r"\d+", prefix)
        return int(found[-1]) if found else -1

    if len(prefixes) > 1 and len({index(p) for p in prefixes}) != len(prefixes):
        raise ArmlabError(f"{who}: cannot order the head's layers {', '.join(sorted(prefixes))}; number them")
    layers = []
    for p in sorted(prefixes, key=index):
        w = arrays[p + "weight"]
        w = w[None, :] if w.ndim == 1 else w
        b = arrays.get(p + "bias", np.zeros(w.shape[0]))
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ArmlabError(f"{who}: layer {p or 'weight'!r} has weight {w.shape} and bias {b.shape}")
        if layers and layers[-1][0].shape[0] != w.shape[1]:
            raise ArmlabError(
                f"{who}: layer {p!r} takes {w.shape[1]} inputs but the layer before gives {layers[-1][0].shape[0]}"
            )
        layers.append((w, b))
    return layers


class HeadModel:
    def __init__(self, scorer: ScorerSpec, path: Path):
        who = f"scorer {scorer.name!r}"
        arrays, names = read_head(path, who)
        self.layers = head_layers(arrays, who)
        self.act = ACTIVATIONS[scorer.activation]
        self.dim = self.layers[0][0].shape[1]
        self.w0_f32 = self.layers[0][0].astype(np.float32)  # [k, d]
        self.column = scorer.column
        outputs = self.layers[-1][0].shape[0]
        self.label_index: int | None = None
        if outputs > 1:
            label = scorer.label
            if label is None:
                raise ArmlabError(f"{who}: the head has {outputs} outputs; set label to the one to score")
            if label in names:
                self.label_index = names.index(label)
            elif label.isdigit() and int(label) < outputs:
                self.label_index = int(label)
            else:
                listed = f" (labels: {', '.join(names)})" if names else ""
                raise ArmlabError(f"{who}: label {label!r} is not an output index below {outputs}{listed}")

    def score(self, table: pa.Table) -> np.ndarray:
        emb, valid = embeddings(table.column(0), self.dim, str(self.column))
        out = nan_scores(table.num_rows)
        # The first layer on the float32 embeddings as read (no float64 copy of the matrix: its
        # read is the whole cost of this scorer), the small rest in float64. einsum, not `@`: a
        # single-threaded C loop, where BLAS's thread pool cost 400x more on a shared 2-core box
        # for a [n, 768] x [768, 1] product, and a row's arithmetic never depends on threads.
        x = np.einsum("nd,kd->nk", emb, self.w0_f32).astype(np.float64) + self.layers[0][1]
        for i, (w, b) in enumerate(self.layers):
            if i:
                x = np.einsum("nd,kd->nk", x, w) + b
            if i < len(self.layers) - 1:
                x = self.act(x)
        if self.label_index is None:
            y = x[:, 0]
        else:
            z = np.exp(x - x.max(axis=1, keepdims=True))
            y = z[:, self.label_index] / z.sum(axis=1)
        out[valid] = y
        return out


def embeddings(col: pa.ChunkedArray | pa.Array, dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The non-null embeddings as a float32 [n, dim] matrix (zero-copy from Arrow when they are
    float32 without nulls inside), and which rows they belong to."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
        pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)
    ):
        raise ArmlabError(
            f"column {name!r} has type {t}, not a list of floats; set the head's column to the embedding"
        )
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(arr), dim).to_numpy(zero_copy_only=False)
    if (bad := np.flatnonzero(lengths != dim)).size:
        raise ArmlabError(
            f"column {name!r}: row {int(bad[0])} has {int(lengths[bad[0]])} values, the head takes {dim}"
        )
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(-1, dim), valid
