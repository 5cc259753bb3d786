"""Reading indexed datasets: megatron's packed GPT datasets, the micro-batch sampler, CP batches.

Packing (megatron-core's ``GPTDataset``, built by ``BlendedMegatronDatasetBuilder``): the
documents of a split are shuffled (seeded) and concatenated, EOS-separated as written by the
preprocessor, and cut into samples of ``seq_length + 1`` tokens that cross document boundaries;
samples are then shuffled (seeded). Sample ``i`` gives ``tokens = s[:-1]``, ``labels = s[1:]``.
No position reset, no attention-mask reset, EOS tokens are trained on (``loss_mask`` is 1 except
on padding, which only a final partial validation sample can have), no attention mask is built
(causal attention needs none).

Index cache: megatron writes the document/sample/shuffle indices as ``.npy`` files under
``cache_dir`` (default: ``<prefix>/cache/GPTDataset_indices/``, a directory next to the data),
named by a hash of everything that determines them (path, split, seed, sequence length,
number of samples, tokenizer). With torch.distributed initialised, global rank 0 builds them,
all ranks meet at a barrier, then the others load them: every rank must call
:func:`build_gpt_datasets` and the cache directory must be one filesystem shared by all ranks.

Sampling (:class:`MicroBatchSampler`) follows megatron's ``MegatronPretrainingSampler``: from
``consumed_samples`` on, consecutive runs of ``micro_batch_size * data_parallel_size`` samples
form one micro-step of the whole job, and data-parallel rank ``r`` takes the ``r``-th slice of
``micro_batch_size`` of it. The global order therefore does not depend on the DP size, and
resuming from a checkpoint's ``consumed_samples`` continues the uninterrupted sequence exactly.

Batches: :func:`to_batch` stacks samples into ``tokens``, ``labels``, ``position_ids`` (int64)
and ``loss_mask`` (float32), each ``[b, seq_length]``; :func:`slice_batch_for_cp` cuts every one
of them along the sequence with the zigzag layout of
:mod:`harpe_megatron.parallel.zigzag` (so ``position_ids`` keep naming each token's global
position).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType

from harpe_megatron.parallel.zigzag import slice_for_cp_rank

__all__ = [
    "BATCH_KEYS",
    "IndexedDatasetInfo",
    "MicroBatchSampler",
    "build_gpt_datasets",
    "check_indexed_dataset",
    "micro_batch_indices",
    "slice_batch_for_cp",
    "to_batch",
]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """Sizes of an indexed dataset, read from its ``.idx`` header and checked against the ``.bin``."""

    prefix: str
    dtype: str
    sequences: int
    documents: int
    tokens: int


def check_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Check that ``prefix.bin``/``prefix.idx`` exist, are complete and agree; return their sizes.

    Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` naming a file that is
    not an index, truncated, or of another size than its index announces.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"indexed dataset file missing: {path} (data prefix {prefix!r} needs {prefix}.bin and "
                f"{prefix}.idx, written by tools/preprocess_data.py)"
            )
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_IDX_HEADER_BYTES)
        if len(header) < _IDX_HEADER_BYTES:
            raise ValueError(f"{idx_path}: truncated ({idx_size} bytes, shorter than the header)")
        if header[:9] != _IDX_MAGIC:
            raise ValueError(f"{idx_path}: not a megatron indexed-dataset index (bad magic bytes)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != 1:
            raise ValueError(f"{idx_path}: unsupported index version {version}")
        try:
            dtype = DType.dtype_from_code(header[17])
        except ValueError:
            raise ValueError(f"{idx_path}: unknown token dtype code {header[17]}") from None
        n_seq, n_doc = struct.unpack("<QQ", header[18:34])
        expected = _IDX_HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
        if idx_size < expected:
            raise ValueError(f"{idx_path}: truncated ({idx_size} bytes, its header announces {expected})")
        if idx_size not in (expected, expected + n_seq):  # + n_seq: the modes of a multimodal index
            raise ValueError(f"{idx_path}: {idx_size} bytes, its header announces {expected}")
        if n_doc < 1:
            raise ValueError(f"{idx_path}: no document boundaries")
        bin_expected = 0
        if n_seq:
            f.seek(_IDX_HEADER_BYTES + (n_seq - 1) * 4)
            (last_len,) = struct.unpack("<i", f.read(4))
            f.seek(_IDX_HEADER_BYTES + n_seq * 4 + (n_seq - 1) * 8)
            (last_ptr,) = struct.unpack("<q", f.read(8))
            bin_expected = last_ptr + last_len * np.dtype(dtype).itemsize
        f.seek(_IDX_HEADER_BYTES + n_seq * 12 + (n_doc - 1) * 8)
        (last_doc,) = struct.unpack("<q", f.read(8))
        if last_doc != n_seq:
            raise ValueError(f"{idx_path}: document boundaries end at {last_doc}, not at the {n_seq} sequences")
    bin_size = os.path.getsize(bin_path)
    if bin_size < bin_expected:
        raise ValueError(f"{bin_path}: truncated ({bin_size} bytes, {idx_path} indexes {bin_expected})")
    if bin_size != bin_expected:
        raise ValueError(f"{bin_path}: {bin_size} bytes but {idx_path} indexes {bin_expected} (files from different runs?)")
    return IndexedDatasetInfo(prefix=prefix, dtype=np.dtype(dtype).name, sequences=n_seq,
                              documents=n_doc - 1, tokens=bin_expected // np.dtype(dtype).itemsize)


def build_gpt_datasets(
    prefixes: Sequence[str],
    weights: Sequence[float] | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    tokenizer: Any,
    cache_dir: str | None = None,
) -> tuple[Any, Any, Any]:
    """(train, valid, test) packed GPT datasets over the blend of ``prefixes``.

    ``split`` is megatron's ``"train,valid,test"`` weights applied to the documents of every
    prefix (e.g. ``"98,2,0"``); a split with weight 0 is ``None``. ``num_samples`` is the
    number of samples each split must provide (megatron repeats the data in further shuffled
    epochs as needed). ``weights``: blend weights, one per prefix; ``None`` with several
    prefixes weighs them by their token counts (like megatron's default, but sized to
    ``num_samples``). Each returned dataset yields dicts of ``tokens``, ``labels``,
    ``loss_mask``, ``position_ids`` (and ``dataset_id`` for a blend).

    Must be called on every rank when torch.distributed is initialised (see the module
    docstring); works without it too.
    """
    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise ValueError("no data prefix given (data.paths is empty)")
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    if len(num_samples) != 3 or any(n is None or n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be 3 non-negative counts (train, valid, test), got {num_samples}")
    infos = [check_indexed_dataset(p) for p in prefixes]
    for info in infos:
        if info.tokens <= 1:
            raise ValueError(f"{info.prefix}: the dataset holds {info.tokens} tokens, too few to draw a sample")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(prefixes):
            raise ValueError(f"{len(weights)} blend weights for {len(prefixes)} data prefixes")
        if any(not w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {weights}")
    if len(prefixes) == 1:
        weights = None  # a single dataset: no blending layer
    elif weights is None:
        weights = [float(info.tokens) for info in infos]

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [int(n) for n in num_samples], lambda: True, config)
    try:
        train, valid, test = builder.build()
    except FileNotFoundError as exc:
        if dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() != 0:
            where = cache_dir or "<prefix>/cache/GPTDataset_indices (the default)"
            raise RuntimeError(
                f"rank {dist.get_rank()} cannot read the dataset index cache that rank 0 built ({exc}); "
                f"the cache directory {where} must be on a filesystem shared by all ranks (data.cache_dir)"
            ) from exc
        raise
    return train, valid, test


def micro_batch_indices(
    consumed_samples: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int
) -> range:
    """Sample indices of this DP rank's next micro-batch after ``consumed_samples`` (global count)."""
    start = consumed_samples + data_parallel_rank * micro_batch_size
    return range(start, start + micro_batch_size)


class MicroBatchSampler:
    """Deterministic, resumable iterator over this data-parallel rank's micro-batches.

    Each step yields the list of ``micro_batch_size`` samples (``dataset[i]``) of this rank and
    advances :attr:`consumed_samples` by ``micro_batch_size * data_parallel_size`` (the samples
    the whole job consumed). Save ``consumed_samples`` in checkpoints and pass it back to
    continue exactly where training stopped. Stops when a whole micro-step no longer fits in
    ``total_samples`` (default ``len(dataset)``), like megatron's sampler with ``drop_last``.
    """

    def __init__(
        self,
        dataset: Any,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
        total_samples: int | None = None,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        total = len(dataset) if total_samples is None else int(total_samples)
        if not 0 <= consumed_samples <= total:
            raise ValueError(f"consumed_samples {consumed_samples} outside [0, {total}] (the dataset has {total} samples)")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.total_samples = total
        self._consumed = int(consumed_samples)

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks so far (the value to checkpoint)."""
        return self._consumed

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Micro-batches left."""
        return (self.total_samples - self._consumed) // self.samples_per_step

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def next_indices(self) -> range | None:
        """The indices of this rank's next micro-batch (``None`` when exhausted); does not advance."""
        if self._consumed + self.samples_per_step > self.total_samples:
            return None
        return micro_batch_indices(self._consumed, self.micro_batch_size, self.data_parallel_rank,
                                   self.data_parallel_size)

    def __next__(self) -> list[Any]:
        indices = self.next_indices()
        if indices is None:
            raise StopIteration
        samples = [self.dataset[i] for i in indices]
        self._consumed += self.samples_per_step
        return samples

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self._consumed}


def _as_tokens(sample: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(sample) if not isinstance(sample, torch.Tensor) else sample)
    if t.dim() != 1:
        raise ValueError(f"a raw sample must be 1-D (seq_length + 1 token ids), got shape {tuple(t.shape)}")
    return t.long()


def to_batch(samples: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch: ``tokens``, ``labels``, ``position_ids`` (int64) and
    ``loss_mask`` (float32), each ``[len(samples), seq_length]``.

    A sample is either a dict from the GPT dataset (``tokens``/``labels``/``loss_mask``; other
    keys such as ``dataset_id`` are ignored) or a raw 1-D sequence of ``seq_length + 1`` ids
    (then ``tokens = s[:-1]``, ``labels = s[1:]``, ``loss_mask = 1``). ``position_ids`` are
    ``0 .. seq_length - 1`` for every row (no reset at document boundaries).
    """
    if len(samples) == 0:
        raise ValueError("to_batch: no samples")
    tokens, labels, masks = [], [], []
    for s in samples:
        if isinstance(s, Mapping):
            tokens.append(torch.as_tensor(s["tokens"]).long())
            labels.append(torch.as_tensor(s["labels"]).long())
            mask = s.get("loss_mask")
            masks.append(torch.ones(tokens[-1].shape) if mask is None else torch.as_tensor(mask).float())
        else:
            t = _as_tokens(s)
            tokens.append(t[:-1])
            labels.append(t[1:])
            masks.append(torch.ones(t.numel() - 1))
    lengths = {t.numel() for t in tokens} | {t.numel() for t in labels} | {m.numel() for m in masks}
    if len(lengths) != 1:
        raise ValueError(f"to_batch: samples of different lengths {sorted(lengths)}")
    seq_length = lengths.pop()
    batch = {
        "tokens": torch.stack(tokens),
        "labels": torch.stack(labels),
        "loss_mask": torch.stack(masks).float(),
        "position_ids": torch.arange(seq_length, dtype=torch.long).unsqueeze(0).expand(len(samples), -1).contiguous(),
    }
    return batch


def slice_batch_for_cp(batch: Mapping[str, torch.Tensor], cp_rank: int, cp_size: int) -> dict[str, torch.Tensor]:
    """This context-parallel rank's zigzag share of every ``[b, s, ...]`` tensor of ``batch``.

    All tensors (tokens, labels, loss_mask, position_ids, anything else) are cut identically
    along dim 1; the sequence length must be divisible by ``2 * cp_size``. ``cp_size == 1``
    returns the batch as is.
    """
    if cp_size == 1:
        return dict(batch)
    out = {}
    for key, t in batch.items():
        if t.dim() < 2:
            raise ValueError(f"slice_batch_for_cp: {key!r} has shape {tuple(t.shape)}, expected [batch, seq, ...]")
        out[key] = slice_for_cp_rank(t, 1, cp_rank, cp_size)
    return out
