"""Streaming safetensors output: headers come from the plan, tensor bytes are written one by one.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. The format does not:
it is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets of each
tensor), then the raw bytes in offset order (llama_parity/formats/safetensors.py encodes the header).
The plan knows every shape and dtype up front, so we write the header first and then each tensor as
soon as it is produced, holding one at a time.

Tensors arrive as row chunks (converter/executor.py `iter_chunks`). A producer thread reads and
transforms the next chunks while the main thread writes the previous ones: both spend their time
in system calls (pread/write) or torch copies, which release the GIL, so reading and writing
overlap. Chunks live in a small pool of recycled buffers, which bounds memory (the producer waits
when all are in flight) and avoids re-faulting fresh pages for every chunk.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from llama_parity.formats.dtypes import nbytes
from llama_parity.formats.safetensors import INDEX_NAME, encode_header, index_json

def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return nbytes(shape, dtype.itemsize)


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def assign_files(tensors: Sequence[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Greedy split in plan order, like transformers' `max_shard_size` (a tensor never splits)."""
    files: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if files[-1] and size + t.nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(t)
        size += t.nbytes
    return files


def file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(tensors: Sequence[OutTensor]) -> bytes:
    return encode_header(((t.name, t.dtype, t.shape) for t in tensors), {"format": "pt"})


def _as_bytes(t: torch.Tensor) -> memoryview:
    # A uint8 view of the tensor's own memory: no copy, whatever the dtype (bf16 included).
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, mv: memoryview) -> None:
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]


_fadvise = getattr(os, "posix_fadvise", None)


class BufferPool:
    """`count` recycled byte buffers of `size` bytes; `take` blocks while all are in flight."""

    def __init__(self, count: int, size: int, stop: threading.Event):
        self.size = size
        self._stop = stop
        self._free: queue.Queue = queue.Queue()
        self._owned: dict[int, torch.Tensor] = {}
        for _ in range(count):
            b = torch.empty(size, dtype=torch.uint8)
            self._owned[b.data_ptr()] = b
            self._free.put(b)

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.size:  # a single row group larger than a chunk: a one-off buffer
            return torch.empty(nbytes, dtype=torch.uint8)
        while True:
            try:
                return self._free.get(timeout=0.2)[:nbytes]
            except queue.Empty:
                if self._stop.is_set():
                    raise _Stopped() from None

    def recycle(self, chunk: torch.Tensor) -> None:
        b = self._owned.get(chunk.untyped_storage().data_ptr())
        if b is not None:
            self._free.put(b)


class _Stopped(Exception):
    pass


_END = object()


class _Producer:
    """The thread that reads and transforms chunks ahead of the writer, through a bounded queue.

    Its exceptions are handed to the writer, which re-raises them in the caller's thread; `stop`
    ends it early (the writer failed or was interrupted) without leaving it blocked.
    """

    def __init__(self, tensors: Sequence[OutTensor], produce: Callable, pool: BufferPool, stop: threading.Event,
                 depth: int):
        self.tensors, self.produce, self.pool, self.stop = tensors, produce, pool, stop
        # Bounded: non-pooled chunks (small tensors, one-offs) must not pile up either.
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="safetensors-producer", daemon=True)

    def _put(self, item) -> None:
        while True:
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                if self.stop.is_set():
                    raise _Stopped() from None

    def _run(self) -> None:
        try:
            for spec in self.tensors:
                out = self.produce(spec, self.pool.take)
                for chunk in ([out] if isinstance(out, torch.Tensor) else out):
                    if self.stop.is_set():  # the writer failed or was interrupted: stop reading now
                        return
                    if chunk.dtype != spec.dtype:
                        raise AssertionError(f"{spec.name}: produced {chunk.dtype}, planned {spec.dtype}")
                    self._put((spec, chunk))
                self._put((spec, _END))
        except _Stopped:
            return
        except BaseException as e:
            try:
                self._put((None, e))
            except _Stopped:
                pass

    def chunks(self, spec: OutTensor):
        """The chunks of `spec`, in order, as the producer delivers them."""
        while True:
            got, chunk = self.q.get()
            if got is None:
                raise chunk
            if chunk is _END:
                return
            if got is not spec:
                raise AssertionError(f"producer out of order: {got.name} while writing {spec.name}")
            yield chunk


def _write_file(path: Path, group: Sequence[OutTensor], producer: _Producer, chunk_bytes: int,
                on_bytes: Callable[[int, str], None] | None, on_tensor: Callable[[OutTensor], None] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    try:
        _write_all(fd, memoryview(_header(group)))
        pos = dropped = 0
        for spec in group:
            done = 0
            for chunk in producer.chunks(spec):
                n = chunk.numel() * chunk.element_size()
                if n:
                    _write_all(fd, _as_bytes(chunk))
                producer.pool.recycle(chunk)
                del chunk
                done += n
                pos += n
                if on_bytes:
                    on_bytes(n, spec.name)
                # Start writeback of what we just wrote and drop what earlier calls already
                # flushed, so a 16 GB output neither evicts everyone else's page cache nor
                # leaves gigabytes of dirty pages for the final sync.
                if _fadvise is not None and pos - dropped >= chunk_bytes:
                    try:
                        _fadvise(fd, 0, pos, os.POSIX_FADV_DONTNEED)
                    except OSError:
                        pass
                    dropped = pos
            if done != spec.nbytes:
                raise AssertionError(f"{spec.name}: produced {done} bytes, planned {spec.nbytes} {spec.shape}")
            if on_tensor:
                on_tensor(spec)
    finally:
        os.close(fd)


def write_shards(out_dir: Path, tensors: Sequence[OutTensor], produce: Callable, *, max_shard_bytes: int,
                 on_tensor: Callable[[OutTensor], None] | None = None,
                 on_bytes: Callable[[int, str], None] | None = None,
                 chunk_bytes: int = 64 << 20, buffers: int = 3) -> list[str]:
    """Write `tensors` (in order) into safetensors files in out_dir, plus the index when sharded.

    `produce(spec, take)` returns the tensor's bytes as an iterable of contiguous tensors (row
    chunks, in order), or one whole tensor; `take(nbytes)` lends it a pooled buffer to fill.
    """
    groups = assign_files(tensors, max_shard_bytes)
    names = file_names(len(groups))
    stop = threading.Event()
    producer = _Producer(tensors, produce, BufferPool(buffers, chunk_bytes, stop), stop, buffers + 2)
    producer.thread.start()
    try:
        for name, group in zip(names, groups):
            _write_file(out_dir / name, group, producer, chunk_bytes, on_bytes, on_tensor)
    finally:
        stop.set()
        producer.thread.join()
    if len(names) > 1:
        weight_map = {t.name: name for name, group in zip(names, groups) for t in group}
        (out_dir / INDEX_NAME).write_text(index_json(weight_map, sum(t.nbytes for t in tensors)))
    return names
