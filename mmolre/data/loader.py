"""Batches from the Arrow cache with the fixed shapes every rank of an MoE run needs.

Training: one permutation per epoch shared by all ranks, cut into equal full batches per rank (the
remainder is dropped), so every rank runs the same number of MoE forwards with the same row count.
Evaluation: each rank takes every world-th sample and the last batch is padded with masked dummy
samples (index -1), so every rank runs the same number of MoE forwards with the same row count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

DUMMY = -1


@dataclass
class Batch:
    ids: list[str]                      # "" for dummy padding samples
    features: dict[str, torch.Tensor]   # modality -> [B, T, F], normalised (token text: [B, T] ids)
    masks: dict[str, torch.Tensor]      # modality -> [B, T] bool
    sentiment: torch.Tensor             # [B]
    emotions: torch.Tensor              # [B, 6] intensities
    has_emotion: torch.Tensor           # [B] bool: the sample has emotion labels
    valid: torch.Tensor                 # [B] bool: False for dummy padding

    def to(self, device) -> "Batch":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Batch(self.ids, move(self.features), move(self.masks), self.sentiment.to(device),
                     self.emotions.to(device), self.has_emotion.to(device), self.valid.to(device))


class FeatureRows:
    """One [N, T, F] feature column as numpy views straight onto its Arrow buffers (one per record batch, the
    memory-mapped file's own pages): a batch is one fancy-index copy per chunk it touches. `datasets`' numpy
    formatting rebuilds each row's nested lists instead, about 5x slower per batch (bench: 5.8 against 1.2 ms
    for MOSI-shaped batches of 32)."""

    def __init__(self, column, shape: tuple[int, int]):
        starts, self.views, start = [], [], 0
        for chunk in column.chunks:
            if not (isinstance(chunk, pa.ExtensionArray) and pa.types.is_list(chunk.storage.type)):
                raise ValueError(f"not an Array2D column: {chunk.type}")
            flat = chunk.storage.flatten().flatten()   # Array2D: list<list<float32>>, no nulls
            self.views.append(flat.to_numpy(zero_copy_only=True).reshape(len(chunk), *shape))
            starts.append(start)
            start += len(chunk)
        self.starts = np.asarray(starts, dtype=np.int64)

    @classmethod
    def of(cls, hf, name: str, shape: tuple[int, int]) -> "FeatureRows | None":
        """The column's views, or None where they cannot be had without a copy (a dataset with an indices
        mapping, or a layout other than the cache's); the caller then reads through `datasets`."""
        table = getattr(hf.data, "table", None)
        if getattr(hf, "_indices", None) is not None or not isinstance(table, pa.Table):
            return None
        try:
            return cls(table.column(name), shape)
        except (ValueError, pa.ArrowException):   # nulls, another layout: no exact view (never wrong data)
            return None

    def take(self, indices: np.ndarray) -> np.ndarray:
        chunk = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), *self.views[0].shape[1:]), dtype=self.views[0].dtype)
        for c in np.unique(chunk):
            here = chunk == c
            out[here] = self.views[c][indices[here] - self.starts[c]]
        return out


class SplitDataset(Dataset):
    """One split of the cache; `__getitems__` fetches a whole batch from Arrow in one call.

    A split of several datasets is their concatenation (still memory-mapped); `parts` names each one and
    its row count, and ids then carry the dataset's name as a prefix ("mosi/video$_$clip").
    """

    def __init__(self, hf_split, modalities: list[str], normalisation: dict,
                 parts: list[tuple[str, int]] | None = None, text_hidden: int | None = None):
        """text_hidden: the text is token ids (`text_ids`) for an encoder of this width inside the model."""
        self.hf = hf_split.with_format("numpy")
        parts = parts or [("", len(self.hf))]
        self.prefixes = [f"{name}/" if len(parts) > 1 else "" for name, _ in parts]
        self.ends = np.cumsum([n for _, n in parts])   # row -> part: searchsorted on the part ends
        self.modalities = list(modalities)
        self.token_text = "text" in self.modalities and text_hidden is not None
        self.features_of = [m for m in self.modalities if not (m == "text" and self.token_text)]
        self.shapes = {m: tuple(self.hf.features[m].shape) for m in self.features_of}
        if self.token_text:
            self.shapes["text"] = (self.hf.features["text_ids"].length, text_hidden)
        self.mean = {m: np.asarray(normalisation[m]["mean"], np.float32) for m in self.features_of}
        self.std = {m: np.asarray(normalisation[m]["std"], np.float32) for m in self.features_of}
        # the features straight from the Arrow buffers; the small columns (ids, labels, lengths) via `datasets`
        self.feature_rows = {m: FeatureRows.of(hf_split, m, self.shapes[m]) for m in self.features_of}
        if all(v is not None for v in self.feature_rows.values()):
            self.small = hf_split.select_columns([c for c in hf_split.column_names
                                                  if c not in self.feature_rows]).with_format("numpy")
        else:
            self.feature_rows, self.small = {}, self.hf

    def __len__(self) -> int:
        return len(self.hf)

    def column(self, name: str) -> np.ndarray:
        """A whole small column (labels, masks) as one array. `[:]` formats it in one call; iterating datasets'
        lazy `Column` (np.asarray of it) formats it row by row, about 0.25 s per 8,000 rows."""
        return np.asarray(self.hf[name][:])

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices) -> Batch:
        indices = np.asarray(indices, dtype=np.int64)
        real = indices != DUMMY
        if (indices[real] < 0).any():
            raise IndexError(f"sample indices are >= 0 or {DUMMY} (padding), got {indices[indices < DUMMY]}")
        b = len(indices)
        rows = self.small[indices[real].tolist()] if real.any() else None

        def column(name, shape, dtype, fill=0):
            out = np.full((b, *shape), fill, dtype=dtype)
            if rows is not None:
                out[real] = self.feature_rows[name].take(indices[real]) if name in self.feature_rows else rows[name]
            return out

        features, masks = {}, {}
        for m in self.modalities:
            t, _ = self.shapes[m]
            if m in self.features_of:
                x = column(m, self.shapes[m], np.float32)
                x = (x - self.mean[m]) / self.std[m]
                x[~real] = 0.0
                length_key = f"{m}_length"
            else:   # token ids (int64, as embeddings take them); a dummy sample is all padding id 0
                x = column("text_ids", (t,), np.int64)
                length_key = "text_length"
            # Dummy samples get a full mask so pooling stays finite; `valid` keeps them out of everything.
            lengths = column(length_key, (), np.int64, fill=t)
            masks[m] = torch.from_numpy(np.arange(t)[None, :] < lengths[:, None])
            features[m] = torch.from_numpy(x)
        ids = [""] * b
        if rows is not None:
            part = np.searchsorted(self.ends, indices[real], side="right")
            for pos, sid, p in zip(np.flatnonzero(real), rows["id"], part):
                ids[pos] = self.prefixes[p] + str(sid)
        return Batch(ids=ids, features=features, masks=masks,
                     sentiment=torch.from_numpy(column("sentiment", (), np.float32)),
                     emotions=torch.from_numpy(column("emotions", (6,), np.float32)),
                     has_emotion=torch.from_numpy(column("has_emotion", (), bool)),
                     valid=torch.from_numpy(real))


def _identity(batch):
    return batch


class ResumableSampler(Sampler):
    """This rank's training samples for one epoch, resumable at any global position, under any world size.

    Each epoch has one permutation of the split (seeded by seed + epoch, as DistributedSampler's), the same
    for every world size. Rank r takes positions r, r + world, r + 2*world, ... so after k batches on every
    rank the run has consumed exactly the first k * batch * world positions. `start_at(epoch, position)`
    starts the epoch at such a position: a resumed run sees exactly the samples the interrupted one had not,
    and a resume under another world size continues the same order from the same place. Each rank gets the
    same number of full batches, a multiple of `multiple` (the gradient accumulation: an epoch ends on an
    optimizer step); the remainder of the epoch is dropped.
    """

    def __init__(self, num_samples: int, world: int, rank: int, seed: int, batch_size: int, multiple: int = 1):
        self.num_samples, self.world, self.rank, self.seed = num_samples, world, rank, seed
        self.batch_size, self.multiple = batch_size, multiple
        self.epoch, self.position = 0, 0

    def batches(self, position: int = 0) -> int:
        """Full batches per rank from `position` to the end of the epoch."""
        per_rank = max(0, self.num_samples - position) // self.world
        return per_rank // self.batch_size // self.multiple * self.multiple

    def start_at(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)[self.position:]
        return iter(order[self.rank::self.world][:len(self)].tolist())

    def __len__(self) -> int:
        return self.batches(self.position) * self.batch_size


def train_loader(ds: SplitDataset, batch_size: int, rank: int, world: int, seed: int,
                 grad_accum: int = 1) -> DataLoader:
    sampler = ResumableSampler(len(ds), world, rank, seed, batch_size, grad_accum)
    if sampler.batches() == 0:
        raise ValueError(f"the train split has {len(ds)} samples, fewer than {grad_accum} micro batch(es) of "
                         f"{batch_size} on each of {world} ranks (one optimizer step)")
    # A generator of its own: a DataLoader otherwise draws from the global RNG each time an epoch's iterator
    # starts, which would shift dropout's random stream after a mid-epoch resume.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=_identity,
                      generator=torch.Generator().manual_seed(seed))


def eval_batches(ds: SplitDataset, batch_size: int, rank: int, world: int):
    """Yield this rank's evaluation batches; all ranks yield the same number of batches of the same size (at most
    the largest rank's share, so a small split is not padded up to a large batch)."""
    n = len(ds)
    per_rank = math.ceil(n / world)
    batch_size = max(1, min(batch_size, per_rank))
    num_batches = math.ceil(per_rank / batch_size)
    mine = np.arange(rank, n, world)
    padded = np.full(num_batches * batch_size, DUMMY, dtype=np.int64)
    padded[:len(mine)] = mine
    for i in range(num_batches):
        yield ds.__getitems__(padded[i * batch_size:(i + 1) * batch_size])
