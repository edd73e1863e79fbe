"""Reading a GGUF file with the `gguf` library: metadata, and tensors left quantized (memory-mapped)."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from kernels.dequant import DEQUANT, SUPPORTED_TYPES
from models.arch import ARCH_NAMES, supported
from models.errors import ModelFileError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as the file stores it: raw blocks, their format, and the logical numpy-order shape."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray


@dataclass
class GGUFModelFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, StoredTensor]
    mapping: np.memmap | None = None  # the file's memory map, which every tensor's bytes are a view of

    def release_pages(self) -> None:
        """Hand the mapped pages back (they are read from the file again when next touched): a model unloaded
        while the server runs holds no memory for weights read in place."""
        mm = getattr(self.mapping, "_mmap", None)
        if mm is not None:
            mm.madvise(mmap.MADV_DONTNEED)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def quantized_bytes(self) -> int:
        return sum(t.raw.nbytes for t in self.tensors.values())


class LeanReader(GGUFReader):
    """GGUFReader whose pieces are plain views of the file, not `np.memmap` objects.

    The library slices its memmap once per string of the vocabulary and merges (~200k for SmolLM2),
    and every memmap slice carries its own attribute dict: ~90 MB at the peak of a load, more than
    the model's weights. Plain ndarray views of the same mapping hold the same bytes (nothing is
    copied); tests/test_gguf_file.py checks both readers give the same fields and tensors.
    """

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        if "_plain" not in self.__dict__:
            self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = self._plain[offset : offset + np.dtype(dtype).itemsize * count].view(dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _read_metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def open_gguf(path: str | Path) -> GGUFModelFile:
    """Open and validate a model file; every failure is a ModelError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = LeanReader(path, "r")
    except Exception as e:  # the gguf library raises assorted errors on damaged files
        raise ModelFileError(f"{path} is a damaged or truncated GGUF file ({e})") from e

    metadata = _read_metadata(reader)
    arch = metadata.get("general.architecture")
    if arch not in ARCH_NAMES:
        raise UnsupportedModelError(f"{path.name}: architecture {arch!r} is not supported; supported: {supported()}")

    tensors = {}
    for t in reader.tensors:
        if t.tensor_type not in DEQUANT:
            raise UnsupportedModelError(
                f"{path.name}: tensor {t.name} is {t.tensor_type.name}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        if t.data.nbytes != t.n_bytes:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} is cut short")
        shape = tuple(int(n) for n in reversed(t.shape))
        tensors[t.name] = StoredTensor(t.name, t.tensor_type, shape, t.data)
    return GGUFModelFile(path, metadata, tensors, reader.data)
