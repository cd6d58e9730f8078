"""Training on the fly: a model's activations streamed into the trainer without touching disk.

A background thread runs the model over the corpus (cycling it when it runs out) and puts row
blocks into a bounded queue, so the model's forward runs ahead of the SAE step. The first
`stat_rows` rows form the *first buffer*: the standardisation is fitted on it (minus the held-out
rows) and the held-out rows are drawn from it. Training batches then come from a shuffle buffer
of `shuffle_rows` rows: it is filled, half of it is drawn at random as batches, and the drawn
slots are refilled from the stream, so rows from many contexts mix in every batch.
Imports `lm.activations`, `lm.corpus`, `data.sources` and `errors` only.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from flashsae.data.sources import ArraySource
from flashsae.errors import ConfigError
from flashsae.lm import activations as A
from flashsae.lm.corpus import iter_contexts


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Train on activations captured on the fly (instead of DATA)."""

    model: str | None = None
    """Transformers model to capture from: a local directory or a name in the local Hugging Face cache."""

    hook: str | None = None
    """Module whose output is captured, named as in model.named_modules() (e.g. transformer.h.6)."""

    text: str | None = None
    """Corpus: a .txt, .jsonl or .parquet file, a folder of them, or a saved datasets directory."""

    context: int = 128
    """Tokens per context, special tokens included."""

    lm_batch: int = 8
    """Contexts per forward pass of the model."""

    keep_special: bool = False
    """Keep rows of special tokens (BOS/EOS/PAD/CLS/SEP)."""

    max_norm_factor: float | None = None
    """Drop rows whose norm exceeds this multiple of the median row norm."""

    stat_rows: int = 65536
    """Rows in the first buffer, on which the standardisation is fitted and from which held-out rows are drawn."""

    shuffle_rows: int = 65536
    """Rows in the shuffle buffer that batches are drawn from."""

    def __post_init__(self) -> None:
        missing = [f"--{n}" for n in ("model", "hook", "text") if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"training on the fly needs --model, --hook and --text; missing {', '.join(missing)}")
        for name in ("context", "lm_batch", "stat_rows", "shuffle_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


STREAM_FIELDS = frozenset(f.name for f in dataclasses.fields(StreamConfig))


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Feed:
    """Exact numbers of rows from an iterator of row blocks, carrying the rest of a block over."""

    def __init__(self, blocks: Iterator[np.ndarray]):
        self.blocks = blocks
        self.rest: np.ndarray | None = None

    def push(self, rows: np.ndarray) -> None:
        """Serve `rows` before anything else."""
        self.rest = rows if self.rest is None else np.concatenate([rows, self.rest])

    def take(self, n: int) -> np.ndarray:
        parts, have = [], 0
        while have < n:
            block = self.rest if self.rest is not None else next(self.blocks)
            self.rest = None
            if have + len(block) > n:
                block, self.rest = block[:n - have], block[n - have:]
            parts.append(block)
            have += len(block)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


class ActivationStream:
    """A running capture: `source` is the first buffer, `batches(...)` the training batches.

    Args:
        cfg: what to capture.
        device: where the model runs.
        prefetch: row blocks (one per forward pass) the producer may run ahead.
        progress: show a bar while the first buffer fills.
    """

    def __init__(self, cfg: StreamConfig, *, device="cpu", prefetch: int = 8, progress: bool = False):
        self.cfg = cfg
        self.name = f"{cfg.model}:{cfg.hook}"
        model, tokenizer = A.load_lm(cfg.model, device=A.device_of(str(device)))
        module = A.find_module(model, cfg.hook)
        self._filter = A.RowFilter(A.special_ids(tokenizer), keep_special=cfg.keep_special,
                                   max_norm_factor=cfg.max_norm_factor)
        contexts = iter_contexts(cfg.text, tokenizer, cfg.context, cycle=True)
        self._blocks = (blocks[0] for blocks in A.iter_row_blocks(
            model, [module], contexts, batch=cfg.lm_batch, row_filters=[self._filter]))
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="flashsae-activations", daemon=True)
        self._thread.start()
        self.feed = _Feed(self._consume())
        first = self._first_buffer(progress)
        self.source = ArraySource(first, self.name)

    def describe(self) -> dict:
        """What ran, for the run's config.json."""
        return {**dataclasses.asdict(self.cfg), "median_norm": self._filter.median_norm,
                "standardize_fitted_on": "the first buffer: stat_rows rows minus the held-out rows"}

    def batches(self, train_ids: np.ndarray, batch_size: int, *, seed: int) -> "StreamBatches":
        """Training batches: the first buffer's `train_ids` rows, then fresh rows, through the shuffle buffer."""
        return StreamBatches(self, np.asarray(train_ids, np.int64), batch_size, seed)

    def close(self) -> None:
        """Stop the producer thread (idempotent)."""
        self._stop.set()
        self._thread.join(timeout=60)

    def _first_buffer(self, progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        n = self.cfg.stat_rows
        with tqdm(total=n, unit="rows", unit_scale=True, desc="first buffer", disable=not progress) as bar:
            parts, have = [], 0
            while have < n:
                parts.append(self.feed.take(min(n - have, 4096)))
                have += len(parts[-1])
                bar.update(len(parts[-1]))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def _produce(self) -> None:
        try:
            for block in self._blocks:
                if not self._put(block.acts):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(_Failure(e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _consume(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if isinstance(item, _Failure):
                raise item.error
            if len(item):
                yield item


class StreamBatches:
    """Duck-typed `BatchIterator`: one endless epoch through a shuffle buffer."""

    def __init__(self, stream: ActivationStream, train_ids: np.ndarray, batch_size: int, seed: int):
        self.stream = stream
        self.batch_size = batch_size
        self.capacity = max(stream.cfg.shuffle_rows, 2 * batch_size)
        self.rng = np.random.default_rng([seed, 1])
        first = stream.source.take(train_ids)
        stream.feed.push(first[self.rng.permutation(len(first))])

    def batches_per_epoch(self) -> int:
        return 1 << 62  # a stream has no epochs: the trainer stops at its row budget

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        feed, bs = self.stream.feed, self.batch_size
        buf = np.array(feed.take(self.capacity), dtype=np.float32)  # (capacity, d_in)
        try:
            while True:
                drawn = self.rng.permutation(len(buf))[: len(buf) // 2 // bs * bs]
                out = buf[drawn]
                for i in range(0, len(out), bs):
                    yield out[i:i + bs]
                buf[drawn] = feed.take(len(drawn))
        finally:
            self.stream.close()


def pop_stream_options(options: dict, data) -> StreamConfig | None:
    """Take the on-the-fly options out of `options`; None when there are none.

    Sets options["data"] to the stream's name ("MODEL:HOOK") so that config.json says what ran.
    """
    found = {k: options.pop(k) for k in list(options) if k in STREAM_FIELDS}
    if not found:
        return None
    if data is not None:
        raise ConfigError("give either DATA or --model/--hook/--text, not both")
    cfg = StreamConfig(**found)
    options["data"] = f"{cfg.model}:{cfg.hook}"
    return cfg


def open_stream(cfg: StreamConfig | None, *, device: str, world_size: int = 1, resume: bool = False,
                progress: bool = False) -> ActivationStream | None:
    """Start capturing (None when `cfg` is None): the model runs ahead of training from here on."""
    if cfg is None:
        return None
    if resume:
        raise ConfigError("--resume is not available when training on the fly; start the run again")
    if world_size > 1:
        raise ConfigError("training on the fly runs in one process; harvest to a directory for torchrun")
    return ActivationStream(cfg, device=device, progress=progress)
