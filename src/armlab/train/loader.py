"""Distributed pretraining loader: BOS-aligned best-fit packing over (file, row group) work units.

Packing follows nanochat's dataloader (unchanged from 48804bf to 92d63d4: BOS-aligned best fit):
every row of T+1 tokens starts with a document's BOS; from a buffer of 1000 tokenized documents
(refilled 128 at a time) the largest one that still fits is placed, and when none fits, the
shortest is cropped to fill the row exactly (its remainder is dropped). No padding: every
position is a real token and can attend back to its document's BOS.

Distribution fixes the playbook's hang (DESIGN.md invariant 4). nanochat strides row groups
*within each file* by rank, so a dir of one-row-group files gives rank 1 nothing and it waits in
the first collective forever. Here the work units are every (file, row group) of the dir, listed
in a fixed order; each epoch they are put in a seeded order that depends on the epoch, and unit i
of that order goes to rank i % W. Any W <= number of units is fed, `check_feeds` refuses a
smaller layout at start-up, and the stream is unbounded (each rank counts its own epochs), so
every rank can run the same number of steps.

State is exact: `state_dict()` records the stream position (epoch, unit, row within the unit)
and the tokens of the documents still in the packing buffer, so a loader built with `state=`
yields bitwise the same batches as one that was never interrupted. A background thread makes
batches ahead (`prefetch`) without changing them or the state.
"""

from __future__ import annotations

import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from armlab.data.identity import mix
from armlab.errors import ArmlabError
from armlab.text import plural
from armlab.train.units import check_feeds, units_fingerprint

STATE_VERSION = 1


@dataclass(frozen=True)
class Position:
    """Where the stream stands after a batch: the next document to tokenize and the packing buffer."""

    epoch: int
    unit: int  # index into this rank's units of `epoch`
    row: int  # next row to tokenize in that unit
    unit_rows: int  # rows in that unit once it is open (0 before), for the fractional epoch
    docs: tuple[np.ndarray, ...]  # buffered documents (BOS first), in arrival order; never mutated
    lens: np.ndarray


class DataLoader:
    """`next(loader) -> (x, y)`: int64 CPU tensors (B, T), y = x shifted by one token.

    `shuffle=False` visits units in file order (the eval set); `epochs=None` streams forever,
    `epochs=n` stops (StopIteration) once n passes are packed and the buffer can no longer fill a
    batch. `buffer_docs` and `tokenizer_batch` are nanochat's 1000 and 128 by default.

    With `prefetch=n > 0` a background thread reads, tokenizes and packs up to n batches ahead
    (tiktoken releases the GIL), so the next batch is ready while the GPU finishes a step. It is
    the only thread that touches the packing state, and each batch carries the position after it,
    so batches and `state_dict()` are exactly those of `prefetch=0`.
    """

    def __init__(
        self,
        data_dir: str | Path,
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        state: dict[str, Any] | None = None,
        *,
        shuffle: bool = True,
        epochs: int | None = None,
        buffer_docs: int = 1000,
        tokenizer_batch: int = 128,
        threads: int = 4,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ArmlabError(f"loader: rank {rank} is outside world size {world_size}")
        self.data_dir = Path(data_dir)
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.epochs = shuffle, epochs
        self.buffer_docs, self.tokenizer_batch, self.threads = buffer_docs, tokenizer_batch, threads
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self.files, self.units = check_feeds(self.data_dir, world_size)
        self.layout = units_fingerprint(self.files, self.units)
        # every rank gets ceil or floor of N/W units per epoch, the same count in every epoch
        self.units_per_epoch = len(range(rank, len(self.units), world_size))

        # stream position: the next document to tokenize is row `_row` of unit `_pos` of epoch `_epoch`
        self._epoch, self._pos, self._row = 0, 0, 0
        self._texts: list[str] | None = None  # the current unit's documents, read lazily
        # packing buffer: tokenized documents (BOS first) in arrival order, and their lengths
        self._docs: list[np.ndarray] = []
        self._lens = np.empty(0, dtype=np.int64)
        # which document each buffered one is: its ordinal in this loader's stream (-1: restored)
        self._ids: list[int] = []
        self._n_read = 0
        if state is not None:
            self._load_state(state)
        self._consumed = self._position()  # position after the last batch handed out
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._finished = False
        self._failed: BaseException | None = None

    # -- stream of documents -------------------------------------------------------------------
    def epoch_units(self, epoch: int) -> np.ndarray:
        """Indices (into self.units) of this rank's units in epoch `epoch`, in visiting order."""
        order = np.arange(len(self.units), dtype=np.int64)
        if self.shuffle:
            # seeded, epoch-dependent, version-stable order (SplitMix64 of the unit index)
            order = np.argsort(mix(order.astype(np.uint64), self.seed, salt=epoch), kind="stable")
        return order[self.rank :: self.world_size]

    def _exhausted(self) -> bool:
        return self.epochs is not None and self._epoch >= self.epochs

    def _read_unit(self) -> list[str]:
        unit = self.units[self.epoch_units(self._epoch)[self._pos]]
        path = self.files[unit.file]
        try:
            column = pq.ParquetFile(path).read_row_group(unit.row_group, columns=["text"]).column(0)
        except Exception as e:  # torn, replaced or deleted under a running loader
            raise ArmlabError(
                f"{path}: cannot read row group {unit.row_group} ({e}); did the data dir change under the run? "
                f"run `armlab check {self.data_dir}`"
            ) from None
        if column.null_count:
            raise ArmlabError(
                f"{path}: column 'text' has {plural(column.null_count, 'null')} in row group {unit.row_group}; "
                f"run `armlab check {self.data_dir}`"
            )
        return column.to_pylist()

    def _refill(self) -> None:
        """Tokenize the next batch of documents (never spanning units) into the buffer."""
        if self._texts is None:
            self._texts = self._read_unit()
        texts = self._texts[self._row : self._row + self.tokenizer_batch]
        self._row += len(texts)
        if self._row >= len(self._texts):  # unit done: advance to the next unit / epoch
            self._texts, self._row, self._pos = None, 0, self._pos + 1
            if self._pos == self.units_per_epoch:
                self._epoch, self._pos = self._epoch + 1, 0
        ids = self.tokenizer.encode(texts, prepend_bos=True, num_threads=self.threads)
        self._docs.extend(np.asarray(d, dtype=np.int32) for d in ids)
        self._lens = np.concatenate([self._lens, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))])
        self._ids.extend(range(self._n_read, self._n_read + len(ids)))
        self._n_read += len(ids)

    def _take(self, i: int) -> tuple[np.ndarray, int]:
        self._lens = np.delete(self._lens, i)
        return self._docs.pop(i), self._ids.pop(i)

    def _fill_row(self, row: np.ndarray, owners: np.ndarray | None = None) -> bool:
        """Best-fit pack one row of T+1 tokens (and, given `owners`, the stream ordinal of each
        token's document); False when a finite stream cannot fill it."""
        cap, pos = len(row), 0
        while pos < cap:
            while len(self._docs) < self.buffer_docs and not self._exhausted():
                self._refill()
            if not self._docs:
                return False
            remaining = cap - pos
            fits = np.where(self._lens <= remaining, self._lens, -1)
            best = int(np.argmax(fits))  # first of the largest documents that fit entirely
            if fits[best] > 0:
                doc, owner = self._take(best)
                end = pos + len(doc)
                row[pos:end] = doc
            else:  # nothing fits: crop the shortest document to fill the row exactly
                doc, owner = self._take(int(np.argmin(self._lens)))
                end = cap
                row[pos:] = doc[:remaining]
            if owners is not None:
                owners[pos:end] = owner
            pos = end
        return True

    def pack_rows(self, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The rows (R, T+1) of a finite stream packed one after another, up to `max_rows`, and
        for every token the ordinal of its document in the stream (file order for shuffle=False
        on one rank: the eval set's document order). No prefetch, no state (the eval set's use)."""
        if self.epochs is None and max_rows is None:
            raise ValueError("pack_rows needs a finite stream (epochs=) or max_rows")
        rows, owners = [], []
        while max_rows is None or len(rows) < max_rows:
            row = np.empty(self.T + 1, dtype=np.int32)
            owner = np.empty(self.T + 1, dtype=np.int32)
            if not self._fill_row(row, owner):
                break
            rows.append(row)
            owners.append(owner)
        shape = (len(rows), self.T + 1)
        return (np.stack(rows) if rows else np.empty(shape, np.int32)), (
            np.stack(owners) if owners else np.empty(shape, np.int32)
        )

    def _position(self) -> Position:
        unit_rows = len(self._texts) if self._texts is not None else 0
        return Position(self._epoch, self._pos, self._row, unit_rows, tuple(self._docs), self._lens.copy())

    def _make_batch(self) -> tuple[torch.Tensor, torch.Tensor, Position] | None:
        """The next batch and the position after it; None when a finite stream is done."""
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for b in range(self.B):
            if not self._fill_row(rows[b]):
                return None
        # numpy makes the shifted copies (torch's strided CPU copy is ~100x slower here)
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, self._position()

    # -- background prefetch --------------------------------------------------------------------
    @staticmethod
    def _produce(ref: weakref.ref[DataLoader], q: queue.Queue, stop: threading.Event) -> None:
        """Thread body: make batches until stopped, done, failed, or the loader is garbage."""
        while not stop.is_set():
            loader = ref()  # strong only while making a batch, so a dropped loader ends the thread
            if loader is None:
                return
            try:
                item: Any = loader._make_batch()
            except BaseException as e:  # handed to the consumer, raised there with its traceback
                item = e
            del loader
            while True:
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    if stop.is_set() or ref() is None:
                        return
            if item is None or isinstance(item, BaseException):
                return

    def close(self) -> None:
        """Stop the prefetch thread; the loader is done (next() raises StopIteration), its state stays valid."""
        self._stop.set()
        self._finished = True  # batches made ahead were dropped: continuing would skip them
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- public ---------------------------------------------------------------------------------
    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._failed is not None:
            raise self._failed
        if self._finished:
            raise StopIteration
        if self.prefetch <= 0:
            item = self._make_batch()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                args = (weakref.ref(self), self._queue, self._stop)
                self._thread = threading.Thread(
                    target=self._produce, args=args, name="armlab-loader", daemon=True
                )
                self._thread.start()
            assert self._queue is not None
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._failed = item  # the thread has ended; every later call raises the same error
                raise item
        if item is None:
            self._finished = True
            raise StopIteration
        x, y, self._consumed = item
        return x, y

    @property
    def epoch(self) -> float:
        """Epochs of this rank's documents consumed so far (fractional).

        Counts documents handed out in batches: those read but still waiting in the packing buffer
        are not consumed yet (on a small arm the buffer can hold most of an epoch).
        """
        p = self._consumed
        epoch = p.epoch
        order = self.epoch_units(epoch)
        consumed = sum(self.units[i].rows for i in order[: p.unit]) + p.row - len(p.docs)
        while consumed < 0 and epoch > 0:  # buffered documents from the previous epoch(s)
            epoch -= 1
            consumed += sum(self.units[i].rows for i in self.epoch_units(epoch))
        total = sum(self.units[i].rows for i in self.epoch_units(epoch))
        return epoch + max(consumed, 0) / total

    def _identity(self) -> dict[str, Any]:
        """What a saved state must match to be restored here (same data, rank, layout, tokenizer)."""
        return {
            "layout": self.layout,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "tokenizer": getattr(self.tokenizer, "fingerprint", None),
        }

    def state_dict(self) -> dict[str, Any]:
        """Exact position after the last batch returned: resuming yields the batches that follow."""
        p = self._consumed
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": p.epoch,
            "unit": p.unit,
            "row": p.row,
            "buffer_lens": torch.from_numpy(p.lens.copy()),
            "buffer_tokens": torch.from_numpy(np.concatenate([np.empty(0, dtype=np.int32), *p.docs])),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ArmlabError(
                f"loader state version {state.get('version')} is not {STATE_VERSION}; start a new run"
            )
        for key, value in self._identity().items():
            if state.get(key) != value:
                what = "data dir layout" if key == "layout" else key
                raise ArmlabError(
                    f"loader state was saved with {what} {state.get(key)!r}, this run has {value!r}: resume with "
                    "the same data, tokenizer, seed and number of ranks, or start a new run"
                )
        self._epoch, self._pos, self._row = int(state["epoch"]), int(state["unit"]), int(state["row"])
        lens = np.asarray(state["buffer_lens"], dtype=np.int64)
        tokens = np.asarray(state["buffer_tokens"], dtype=np.int32)
        self._lens = lens.copy()
        self._docs = list(np.split(tokens, np.cumsum(lens)[:-1])) if len(lens) else []
        self._ids = [-1] * len(self._docs)
        if self._row:
            self._texts = self._read_unit()
