"""Checkpoints streamed tensor by tensor, so resident memory stays near the largest single tensor:
  * each tensor is read with its own `safe_open` (an open file's mmap keeps every page read so far
    resident, so reading a whole shard through one handle costs a whole shard of RSS), and the next one
    is read on a worker thread while the current one is transformed and written;
  * output shards are streamed: the safetensors header is computed up front from the known shapes,
    then tensor bytes follow one by one (the format is an 8-byte length, a JSON header, raw bytes).
A checkpoint is written into `OUT.tmp-XXXX` beside OUT and renamed when complete (`write_checkpoint`), so a
failure leaves nothing half-written. Shared by merge, unmerge, extract and compose.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lorakit.checkpoints.layout import ST_DTYPES, BaseTensor, OutTensor, nbytes
from lorakit.errors import LorakitError

MAX_SHARD_BYTES = 5_000_000_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def write_checkpoint(plan: list[OutTensor], out: Path, transform: Callable[[Any, OutTensor], Any],
                     side_files: Callable[[Path, list], None], *, max_shard_bytes: int = MAX_SHARD_BYTES,
                     progress: Callable[[int, int, str], None] | None = None) -> list[tuple[str, list[OutTensor]]]:
    """Stream the checkpoint `plan` describes into `out`, tensor by tensor.

    Each source tensor is read ahead on a worker thread, `transform(tensor, o)` gives the output tensor
    (in `o.dtype`), shards of at most `max_shard_bytes` are written one by one into `OUT.tmp-XXXX`,
    `side_files(tmp, shards)` adds the files beside the weights, and the directory is renamed into place
    (removed on any failure). Shared by merge and unmerge.

    Returns:
        The shards as (file name, tensors).
    """
    groups = _shards(plan, max_shard_bytes)
    named = [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors", g)
             for i, g in enumerate(groups)]
    total = sum(nbytes(o) for o in plan)
    done = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    reads = read_ahead([o for _, g in named for o in g])
    try:
        for fname, tensors in named:
            def produce(o: OutTensor) -> Any:
                nonlocal done
                name, w = next(reads)
                assert name == o.name, (name, o.name)
                t = transform(w, o)
                del w
                done += nbytes(o)
                if progress:
                    progress(done, total, o.name)
                return t

            _write_shard(tmp / fname, tensors, produce)
        side_files(tmp, named)
        replace_dir(tmp, out)
    except BaseException:
        reads.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return named


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished checkpoint into place; an existing `out` (overwrite) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _shards(plan: list[OutTensor], cap: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for o in plan:
        n = nbytes(o)
        if shards[-1] and size + n > cap:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += n
    return shards



def _write_shard(path: Path, tensors: list[OutTensor], produce: Callable[[OutTensor], Any]) -> int:
    """Stream one safetensors file: the header from known shapes, then each tensor as it is produced."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for o in tensors:
        n = nbytes(o)
        header[o.name] = {"dtype": _ST_NAMES[o.dtype], "shape": list(o.src.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for o in tensors:
            t = produce(o)
            if tuple(t.shape) != tuple(o.src.shape):
                raise LorakitError(f"{o.name}: the adapter's tensor has shape {tuple(t.shape)}, the base's "
                                   f"{tuple(o.src.shape)}", hint="is --base the model this adapter was trained on?")
            assert t.dtype == getattr(torch, o.dtype), (o.name, t.dtype, o.dtype)
            fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def read_tensor(t: BaseTensor):
    """One tensor through its own safe_open, so the file's mapping (and its resident pages) closes at once."""
    from safetensors import safe_open

    with safe_open(t.file, framework="pt") as fh:
        return fh.get_tensor(t.name)


def tensors_equal(a: BaseTensor, b: BaseTensor, chunk_bytes: int = 64 << 20) -> bool:
    """Whether two checkpoint tensors hold the same values, read a block of rows at a time (`chunk_bytes` of each
    resident at most), so comparing an embedding table costs no more memory than a block of it. Each block opens
    the files anew: a mapping kept open keeps every page read through it resident."""
    from safetensors import safe_open

    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    if not a.shape:
        return bool((read_tensor(a) == read_tensor(b)).all())
    step = max(1, chunk_bytes // (4 * math.prod(a.shape[1:])))  # rows per block (at most 4 bytes a value)
    for i in range(0, a.shape[0], step):
        with safe_open(a.file, framework="pt") as fa, safe_open(b.file, framework="pt") as fb:
            if not bool((fa.get_slice(a.name)[i:i + step] == fb.get_slice(b.name)[i:i + step]).all()):
                return False
    return True


def read_ahead(tensors: list[OutTensor]) -> Iterator[tuple[str, Any]]:
    """Yield (name, base tensor) in order while a worker thread already reads the next one from disk.

    Reading overlaps the merge arithmetic and the writing of the previous tensor (disk reads and writes
    were each waiting on the other); at most two base tensors are resident at a time."""
    from concurrent.futures import ThreadPoolExecutor

    if not tensors:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-merge-read") as pool:
        pending = pool.submit(read_tensor, tensors[0].src)
        for i, o in enumerate(tensors):
            w = pending.result()
            pending = pool.submit(read_tensor, tensors[i + 1].src) if i + 1 < len(tensors) else None
            yield o.name, w
            del w
        if pending is not None:
            pending.result()



def peak_rss() -> int:
    """This process's peak resident memory (Linux VmHWM: unlike ru_maxrss, not inherited across fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



def find_tokenizer(candidates: list[Path]) -> Path | None:
    """The first directory of `candidates` that holds a tokenizer, or None."""
    return next((d for d in candidates if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()),
                None)


def copy_tokenizer(tmp: Path, candidates: list[Path]) -> None:
    """Copy the tokenizer files of the first of `candidates` that has a tokenizer into `tmp`."""
    if (d := find_tokenizer(candidates)) is not None:
        for name in TOKENIZER_FILES:
            if (d / name).is_file():
                shutil.copy2(d / name, tmp / name)
