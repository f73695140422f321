"""The writer of resume checkpoints' tensor files (nanolisa/resume.py): DCP's HuggingFace safetensors
writer, writing each file tensor by tensor.

A module of its own because torch.distributed.checkpoint takes a second to import: resume.py imports it
only when it writes or reads a checkpoint, so a run that writes none, chat.py, eval.py and a bad flag's
one-line error never pay for it.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch
import torch.distributed.checkpoint as dcp

from nanolisa.pretrained import SAFETENSORS_DTYPES


class StreamingHFWriter(dcp.HuggingFaceStorageWriter):
    """DCP's HuggingFace safetensors writer, writing each file tensor by tensor.

    DCP's own builds a whole file in memory before writing it (safetensors.torch.save: the bytes of every
    tensor at once), so a checkpoint needed twice the weights and AdamW state in host memory (measured
    2.0x, bench/RESULTS.md). Here the header is computed from shapes and dtypes, then each tensor is
    written from its own memory (a GPU tensor is copied to the host one at a time), as save_pretrained
    does: the same files, names, shards and metadata, which DCP's HuggingFaceStorageReader loads."""

    def write_data(self, plan, planner):
        from torch.distributed.checkpoint._hf_utils import _gen_file_name
        from torch.futures import Future
        data = plan.storage_data
        storage_plan, shard = data.get("fqn_to_index_mapping"), data.get("shard_index")
        buckets = self._split_by_storage_plan(storage_plan, plan.items) if plan.items else {}
        highest = max(storage_plan.values()) if storage_plan is not None else 1
        results = []
        for index, items in buckets.items():
            name = _gen_file_name(index, highest, shard)
            results += _write_safetensors(os.path.join(self.path, name), name, items, planner)
        done: Future = Future()
        done.set_result(results)
        return done


def _write_safetensors(path: str, name: str, items, planner) -> list:
    """One safetensors file of DCP write items, streamed; the WriteResults DCP's writer would return."""
    from torch.distributed.checkpoint._hf_utils import (CUSTOM_METADATA_KEY, DCP_VERSION_KEY, FORMAT_KEY,
                                                        FORMAT_VALUE, HF_DCP_VERSION)
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult
    header, offsets, start = {}, {}, 0
    for item in items:
        fqn, props, chunk = item.index.fqn, item.tensor_data.properties, item.tensor_data.chunk
        n = math.prod(chunk.sizes) * props.dtype.itemsize  # this rank's piece of the tensor (FSDP2: its shard)
        header[fqn] = {"dtype": SAFETENSORS_DTYPES[props.dtype], "shape": list(chunk.sizes),
                       "data_offsets": [start, start + n]}
        offsets[fqn] = {"saved_offsets": list(item.tensor_data.chunk.offsets)}
        start += n
    header["__metadata__"] = {CUSTOM_METADATA_KEY: json.dumps(offsets), DCP_VERSION_KEY: str(HF_DCP_VERSION),
                              FORMAT_KEY: FORMAT_VALUE}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    results = []
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for item in items:
            t = planner.resolve_data(item).detach().cpu().contiguous()  # one tensor at a time on the host
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            length = t.numel() * t.element_size()
            results.append(WriteResult(index=item.index, size_in_bytes=length,
                                       storage_data=_StorageInfo(name, 0, length)))
        f.flush()
        os.fsync(f.fileno())
    return results
