"""Lazy, tensor-by-tensor reading of HF safetensors checkpoint folders.

Handles a single `model.safetensors`, a sharded folder with `model.safetensors.index.json`, and
name prefixes to strip (`vision_model.` in CLIPModel checkpoints). Tensors are memory-mapped and
read one at a time, so converting a 13B model never holds the source checkpoint in RAM.

The safetensors layout (u64 header size, JSON header, raw little-endian data) is read directly:
the `safetensors` numpy API cannot represent bfloat16, the dtype most LLaMA checkpoints ship in,
while `ml_dtypes` (a JAX dependency) can.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read or does not match the model."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    key: str  # name inside the file (before prefix stripping)
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # absolute byte range in the file


def read_header(path: str) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one .safetensors file (reads only the header)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    base = 8 + size
    return {
        name: TensorInfo(path, name, h["dtype"], tuple(h["shape"]), (base + h["data_offsets"][0], base + h["data_offsets"][1]))
        for name, h in header.items()
    }


class TensorSource:
    """Names, shapes and lazy reads of the tensors in a HF checkpoint folder.

    Args:
      directory: folder with `model.safetensors` or `model.safetensors.index.json` (+ shards).
      strip_prefixes: name prefixes removed when present (e.g. `("vision_model.",)`); names are
        then matched against the converter's expectations.
    """

    def __init__(self, directory: str, strip_prefixes: tuple[str, ...] = ()):
        self.directory = directory
        if not os.path.isdir(directory):
            raise CheckpointError(f"checkpoint folder {directory!r} does not exist")
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            found = sorted(os.listdir(directory))
            hint = ""
            if any(n.endswith(".bin") for n in found):
                hint = (
                    " It holds PyTorch .bin weights: re-save them as safetensors first, e.g. "
                    "`AutoModel.from_pretrained(dir).save_pretrained(out)` with transformers."
                )
            raise CheckpointError(
                f"{directory!r} has neither model.safetensors nor model.safetensors.index.json "
                f"(files: {found[:10]}).{hint}"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            path = os.path.join(directory, file)
            if not os.path.exists(path):
                raise CheckpointError(f"shard {file!r} listed in the index is missing from {directory!r}")
            for key, info in read_header(path).items():
                name = key
                for prefix in strip_prefixes:
                    if name.startswith(prefix):
                        name = name[len(prefix) :]
                        break
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} appears twice in {directory!r}")
                self.tensors[name] = info
        self.config: dict = {}
        config_path = os.path.join(directory, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                self.config = json.load(f)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array (no copy until used)."""
        info = self.tensors[name]
        if info.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {info.dtype}")
        dtype = np.dtype(SAFETENSORS_DTYPES[info.dtype])
        count = int(np.prod(info.shape, dtype=np.int64))
        if info.offsets[1] - info.offsets[0] != count * dtype.itemsize:
            raise CheckpointError(f"tensor {name!r}: byte range does not match shape {info.shape}")
        data = np.memmap(info.file, dtype=dtype, mode="r", offset=info.offsets[0], shape=(count,))
        return data.reshape(info.shape)
