"""Training-side view of the data: datasets for the run, and per-rank micro-batch iterators.

Every rank builds the same packed GPT datasets (megatron's builder; index caches are made once).
The train iterator follows megatron's pretraining sampler: global batches are consecutive
samples, each DP rank takes its slice, resuming from ``consumed_samples`` continues the exact
sequence. With a position scheme (CREAM, PoSE) samples are packed at the scheme's target length
and cut to the window with sampled positions. With ``data.document_masking`` each full row gets its
document ids, per-token attended-key counts and boundary loss mask (and, with
``data.reset_position_ids``, per-document positions; data/documents.py). Each micro-batch is then
split along the sequence for this CP rank, every per-token tensor alike: zigzag, or under document
masking the layout balanced by attention work (parallel/cp_layout.py). Pipeline stages all read
the iterator so that they stay in step.
"""

from __future__ import annotations

from typing import Iterator

import torch
from megatron.core import parallel_state

from harpe_megatron.config.run import RunConfig
from harpe_megatron.data.dataset import MicroBatchSampler, build_gpt_datasets, slice_batch_for_cp, to_batch
from harpe_megatron.data.documents import apply_document_masking, cp_share
from harpe_megatron.data.position_sampling import apply_position_scheme
from harpe_megatron.data.tokenizer import SentencePieceTokenizer
from harpe_megatron.distributed.bringup import current_device

__all__ = ["TrainingData"]


class TrainingData:
    def __init__(self, cfg: RunConfig, world_size: int, consumed_train_samples: int, total_train_steps: int):
        if not cfg.data.paths:
            raise ValueError("data.paths is empty: give at least one indexed-dataset prefix")
        if not cfg.data.tokenizer_model:
            raise ValueError("data.tokenizer_model is not set")
        self.cfg = cfg
        self.tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"tokenizer {cfg.data.tokenizer_model} has {self.tokenizer.vocab_size} tokens but "
                f"model.vocab_size is {cfg.model.vocab_size}"
            )
        t = cfg.training
        self.scheme = cfg.data.position_scheme
        window = cfg.data.seq_length
        packed_length = self.scheme.target_length(window) if self.scheme is not None else window
        train_samples = total_train_steps * t.global_batch_size
        eval_runs = (total_train_steps // t.eval_interval) if t.eval_interval else 0
        valid_samples = max(eval_runs, 1) * t.eval_iters * t.global_batch_size
        self.train, self.valid, _ = build_gpt_datasets(
            prefixes=cfg.data.paths, weights=cfg.data.weights, split=cfg.data.split,
            seq_length=packed_length, seed=t.seed, num_samples=(train_samples, valid_samples, 0),
            tokenizer=self.tokenizer, cache_dir=cfg.data.cache_dir,
        )
        self.consumed_train_samples = consumed_train_samples
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_size = parallel_state.get_context_parallel_world_size()

    def _batches(self, dataset, consumed: int) -> Iterator[dict[str, torch.Tensor]]:
        sampler = MicroBatchSampler(
            dataset, micro_batch_size=self.cfg.training.micro_batch_size,
            data_parallel_rank=self.dp_rank, data_parallel_size=self.dp_size, consumed_samples=consumed,
        )
        device = current_device()
        while (indices := sampler.next_indices()) is not None:
            batch = to_batch(next(sampler))
            if self.scheme is not None:
                batch = apply_position_scheme(batch, self.scheme, self.cfg.data.seq_length, indices,
                                              self.cfg.training.seed)
            if self.cfg.data.document_masking:
                batch = apply_document_masking(batch, self.tokenizer.eod, self.cfg.data.reset_position_ids)
                batch = cp_share(batch, self.cp_rank, self.cp_size)  # the CP layout balanced by attention work
            else:
                batch = slice_batch_for_cp(batch, self.cp_rank, self.cp_size)
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def train_iterator(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._batches(self.train, self.consumed_train_samples)

    def valid_iterator(self) -> Iterator[dict[str, torch.Tensor]]:
        """A fresh pass over the validation set from its start (same batches at every eval)."""
        if self.valid is None:
            raise ValueError("training.eval_interval > 0 but data.split leaves no validation share")
        return self._batches(self.valid, 0)
