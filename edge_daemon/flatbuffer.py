"""A structural check of a ``.tflite`` file before any runtime reads it.

tflite-runtime 2.14 reads a truncated model past its end and crashes (or not, by chance) instead
of raising. Reading the FlatBuffer's own offsets here, with bounds checks, turns a truncated or
corrupt file into a clear error every time. This checks the model's top-level tables and every
weight buffer's extent; it is not a full FlatBuffers verifier.
"""

from __future__ import annotations

import struct

# Field indices of the TFLite schema (schema.fbs): table Model, table Buffer.
_MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS, _MODEL_DESCRIPTION, _MODEL_BUFFERS = 1, 2, 3, 4
_MODEL_METADATA, _MODEL_SIGNATURES = 6, 7
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2


class FlatbufferError(ValueError):
    """The file's structure points outside the file."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise FlatbufferError(f"offset {pos} is outside the {len(self.data)}-byte file")
        value: int = struct.unpack_from(fmt, self.data, pos)[0]
        return value

    def u8(self, pos: int) -> int:
        return self._unpack("<B", pos)

    def u16(self, pos: int) -> int:
        return self._unpack("<H", pos)

    def u32(self, pos: int) -> int:
        return self._unpack("<I", pos)

    def i32(self, pos: int) -> int:
        return self._unpack("<i", pos)

    def u64(self, pos: int) -> int:
        return self._unpack("<Q", pos)

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of a table's field, or None when absent."""
        vtable = table - self.i32(table)
        vtable_size = self.u16(vtable)
        slot = 4 + 2 * index
        if slot + 2 > vtable_size:
            return None
        offset = self.u16(vtable + slot)
        return table + offset if offset else None

    def vector(self, table: int, index: int, element_size: int) -> tuple[int, int] | None:
        """(position of the first element, length) of a vector field, bounds-checked."""
        pos = self.field(table, index)
        if pos is None:
            return None
        start = pos + self.u32(pos)
        length = self.u32(start)
        end = start + 4 + length * element_size
        if end > len(self.data):
            raise FlatbufferError(f"a vector of {length} elements at {start} runs past the end")
        return start + 4, length

    def tables(self, table: int, index: int) -> list[int]:
        """Positions of the tables in a vector-of-tables field."""
        vec = self.vector(table, index, 4)
        if vec is None:
            return []
        first, length = vec
        return [first + 4 * i + self.u32(first + 4 * i) for i in range(length)]


def check_tflite(data: bytes) -> None:
    """Raise :class:`FlatbufferError` when the model's structure points outside ``data``."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise FlatbufferError("no TFL3 identifier")
    reader = _Reader(data)
    model = reader.u32(0)
    for index in (_MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS, _MODEL_METADATA, _MODEL_SIGNATURES):
        for table in reader.tables(model, index):
            reader.field(table, 0)  # each table's vtable must be inside the file
    reader.vector(model, _MODEL_DESCRIPTION, 1)
    if not reader.tables(model, _MODEL_SUBGRAPHS):
        raise FlatbufferError("the model has no subgraph")
    for buffer in reader.tables(model, _MODEL_BUFFERS):
        reader.vector(buffer, _BUFFER_DATA, 1)
        offset_pos = reader.field(buffer, _BUFFER_OFFSET)
        size_pos = reader.field(buffer, _BUFFER_SIZE)
        if offset_pos is not None and size_pos is not None:
            # Models over 2 GB keep weights after the FlatBuffer, at an offset from the start.
            offset, size = reader.u64(offset_pos), reader.u64(size_pos)
            if offset > 1 and offset + size > len(data):
                raise FlatbufferError(
                    f"a weight buffer ({size} bytes at {offset}) runs past the end"
                )
