"""Walk a GGUF file's header - metadata and tensor infos - checking every count and length against the
bytes the file has, before ``gguf.GGUFReader`` reads it.

The reader trusts the counts: an array that claims 3·10⁹ elements in a file of 300 kB makes it loop
element by element for hours instead of failing. Here each count is bounded by what is left of the
file (an element takes at least one byte, a string at least its 8-byte length) before anything is
iterated, so a hostile header is refused in milliseconds with the key or tensor named.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

# GGUF value type -> byte size of one value; STRING and ARRAY values are walked
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    def __init__(self, path: Path, data: mmap.mmap) -> None:
        self.path, self.data, self.at = path, data, 0

    def need(self, size: int, what: str) -> None:
        if size < 0 or self.at + size > len(self.data):
            raise ValueError(
                f"{self.path}: not a readable GGUF file ({what} needs {size:,} bytes at byte {self.at:,} of "
                f"{len(self.data):,}); truncated or corrupted?"
            )

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def string(self, what: str) -> str:
        length = self.unpack("<Q", what)
        self.need(length, what)
        try:
            text = bytes(self.data[self.at : self.at + length]).decode("utf-8")
        except UnicodeDecodeError as err:  # the reader decodes strictly too, naming nothing
            raise ValueError(f"{self.path}: not a readable GGUF file ({what} is not UTF-8: {err})") from None
        self.at += length
        return text

    def value(self, kind: int, what: str) -> None:
        if kind in SCALAR_BYTES:
            self.need(SCALAR_BYTES[kind], what)
            self.at += SCALAR_BYTES[kind]
        elif kind == STRING:
            self.string(what)
        elif kind == ARRAY:
            item, count = self.unpack("<I", what), self.unpack("<Q", what)
            least = SCALAR_BYTES.get(item, 8)  # a string or an array takes at least its 8-byte length
            self.need(count * least, f"{what} ({count:,} elements)")
            if item in SCALAR_BYTES:
                self.at += count * least
            else:
                for _ in range(count):
                    self.value(item, what)
        else:
            raise ValueError(f"{self.path}: not a readable GGUF file ({what} has unknown value type {kind})")


def check_gguf_header(path: str | Path) -> None:
    """Raise ``ValueError`` naming the file and the key or tensor whose count or length the file cannot hold."""
    path = Path(path)
    if path.stat().st_size < 24:
        raise ValueError(
            f"{path}: not a readable GGUF file ({path.stat().st_size} bytes, no header); truncated?"
        )
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _walk(_Cursor(path, data))


def _walk(cursor: _Cursor) -> None:
    if cursor.data[:4] != b"GGUF":
        raise ValueError(f"{cursor.path}: not a readable GGUF file (it does not start with 'GGUF')")
    if struct.unpack_from("<I", cursor.data, 4)[0] not in (2, 3):  # v1 (u32 counts), big-endian: the reader's
        return
    cursor.at = 8
    tensors, keys = cursor.unpack("<Q", "the tensor count"), cursor.unpack("<Q", "the metadata count")
    cursor.need(keys * 13, f"{keys:,} metadata entries")  # a key of 8 + 1 bytes, its type, a 1-byte value
    for index in range(keys):
        key = cursor.string(f"metadata key {index}")
        cursor.value(cursor.unpack("<I", key), f"metadata {key!r}")
    cursor.need(tensors * 25, f"{tensors:,} tensor infos")  # a name, n_dims, a type and an offset
    for index in range(tensors):
        name = cursor.string(f"tensor info {index}")
        dims = cursor.unpack("<I", f"tensor {name!r}")
        if dims > MAX_DIMS:
            raise ValueError(f"{cursor.path}: tensor {name!r} has {dims} dimensions (GGUF allows {MAX_DIMS})")
        cursor.need(8 * dims + 12, f"tensor {name!r}")
        cursor.at += 8 * dims + 12
