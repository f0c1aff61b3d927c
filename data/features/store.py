"""FeatureStore: the CNN features of a set of images, where they lie, read only when asked for.

Each image's grid is one row of one of a few fp16 tensors [k, P, C]: a feature cache shard mapped
from disk (its pages are read when a row is gathered, and are the kernel's page cache, not this
process's memory), or a tensor computed in this run. So opening a cache of 120,000 images costs
what reading its file lists costs, and training holds no copy of the whole cache unless it asks for
one (to_tensor: on the GPU, when it fits).

    store = extract_features(...)[0]      # FeatureStore over n images
    grids = store.gather(rows)            # fp16 [len(rows), P, C] on the CPU
    on_gpu = store.to_tensor(device)      # [n, P, C], copied one source at a time

FeatureFeed hands training its batches, from the device or streamed from the store.
"""
from concurrent.futures import ThreadPoolExecutor

import torch


class FeatureStore:
    def __init__(self, sources: list[torch.Tensor], where: torch.Tensor):
        """sources: tensors [k_i, *row_shape] of one dtype; where [n, 2] long: (source, row) of each image.
        The list is shared, not copied: the cache writer puts a mapped shard in place of rows held in memory."""
        self.sources, self.where = sources, where
        self.row_shape, self.dtype = tuple(sources[0].shape[1:]), sources[0].dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "FeatureStore":
        """A store over one tensor's rows, in order."""
        rows = torch.arange(len(tensor))
        return cls([tensor], torch.stack([torch.zeros_like(rows), rows], 1))

    @classmethod
    def concat(cls, first: "FeatureStore", second: "FeatureStore") -> "FeatureStore":
        """A store over first's rows, then second's (no feature is read or copied)."""
        moved = second.where + torch.tensor([len(first.sources), 0])
        return cls(first.sources + second.sources, torch.cat([first.where, moved]))

    def __len__(self) -> int:
        return len(self.where)

    @property
    def shape(self) -> tuple:
        return (len(self), *self.row_shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self.sources[0][:1].nbytes

    def subset(self, rows) -> "FeatureStore":
        """A store over these rows of this one (no feature is read or copied)."""
        return FeatureStore(self.sources, self.where[torch.as_tensor(rows, dtype=torch.long)])

    def gather(self, rows, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows (a tensor, list or slice of image indices) -> [len(rows), *row_shape] on the CPU; into out if given."""
        where = self.where[rows] if isinstance(rows, slice) else self.where[torch.as_tensor(rows, dtype=torch.long)]
        if out is None:
            out = torch.empty((len(where), *self.row_shape), dtype=self.dtype)
        source, row = where[:, 0], where[:, 1]
        for s in source.unique().tolist():
            picked = (source == s).nonzero().squeeze(1)
            out[picked] = self.sources[s][row[picked]]
        return out

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, int):
            return self.gather([rows])[0]
        return self.gather(rows)

    def to_tensor(self, device=None) -> torch.Tensor:
        """All rows as one tensor on device, gathered source by source: the host never holds more than one
        source's rows beyond the result."""
        device = torch.device(device or "cpu")
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        source = self.where[:, 0]
        for s in source.unique().tolist():
            picked = (source == s).nonzero().squeeze(1)
            rows = self.sources[s][self.where[picked, 1]]
            out[picked.to(device)] = rows.to(device, non_blocking=False)
        return out


ROOM_TO_SPARE = 0.5       # the cache goes on the GPU when it takes at most this share of its free memory


def fits_on_device(nbytes: int, device: torch.device, setting: str) -> bool:
    """train.cache_on_device: "true", "false", or "auto": on a CUDA GPU when it fits its free memory with room
    to spare; on a CPU never (the mapped shards are already host memory, shared with the page cache)."""
    if setting in ("true", "false"):
        return setting == "true"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= ROOM_TO_SPARE * free
    return device.type == "mps" and nbytes <= 4 << 30


class FeatureFeed:
    """A training split's features for each batch, on the training device: all of them held there, or each
    batch gathered from the FeatureStore (into pinned memory on CUDA, by a thread) and copied on a side
    stream while the batch before trains.

        feed = FeatureFeed(store, device, on_device)
        feed.inputs                          # [N, P, C] on device, or None when streaming
        grids = feed.batch(rows, next_rows)  # [len(rows), P, C]: rows of the store; next_rows is prefetched
    """

    def __init__(self, store: FeatureStore, device: torch.device, on_device: bool):
        self.store, self.device = store, device
        self.inputs = store.to_tensor(device) if on_device else None
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda and not on_device else None
        # A thread gathers on CUDA, where the host is otherwise idle; on a CPU it would take training's cores.
        self.worker = ThreadPoolExecutor(1) if self.stream else None
        self.pending = None          # (rows, future or result) of the batch prefetched

    def batch(self, rows: torch.Tensor, next_rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.inputs is not None:
            return self.inputs[rows.to(self.device)]
        rows = rows.cpu()
        if self.pending is not None and torch.equal(self.pending[0], rows):
            grids, ready = self.pending[1].result() if self.worker else self.pending[1]
        else:
            grids, ready = self._load(rows)
        self.pending = None
        if next_rows is not None:
            next_rows = next_rows.cpu()
            self.pending = (next_rows, self.worker.submit(self._load, next_rows) if self.worker else None)
            if not self.worker:
                self.pending = None      # on a CPU the gather is a copy: nothing would overlap it
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            grids.record_stream(current)       # made on the side stream: keep its memory until this one is done
        return grids

    def _load(self, rows):
        host = self.store.gather(rows)
        if not self.cuda:
            return host.to(self.device), None
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        with torch.cuda.stream(self.stream):
            on_device = pinned.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return on_device, ready

    def close(self) -> None:
        if self.worker:
            self.worker.shutdown()
