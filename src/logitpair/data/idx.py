"""Reader and writer for the IDX format of MNIST and Fashion-MNIST (plain or gzip).

Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
uint32 sizes, then the data in row-major order, big-endian. Every header is checked against
the file's real size before anything is allocated, and gzip input is never decompressed
past the size its header announces (a gzip bomb stops there).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from logitpair.errors import DataError

_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _TYPES.items()}
MAX_BYTES = 8 << 30  # refuse headers announcing more than 8 GiB, whatever the file


def _parse_header(path: Path, head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(head)} bytes, expected a 4-byte magic number)")
    zero, code, ndim = head[:2], head[2], head[3]
    if zero != b"\x00\x00" or code not in _TYPES:
        raise DataError(f"{path}: bad IDX magic number {head[:4].hex()} (expected 0000 + type code + ndim)")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(head) < header_size:
        raise DataError(
            f"{path}: truncated IDX header: expected {header_size} bytes for {ndim} dimensions, got {len(head)}"
        )
    shape = struct.unpack(f">{ndim}I", head[4:header_size])
    nominal = _TYPES[code].itemsize
    for s in shape:
        nominal *= max(s, 1)  # numpy refuses such shapes even when a 0 makes them empty
    if nominal > MAX_BYTES:
        raise DataError(f"{path}: IDX header shape {shape} is impossible: needs over {MAX_BYTES >> 30} GiB")
    return _TYPES[code], tuple(shape), header_size


def _expected_size(dtype: np.dtype, shape: tuple[int, ...], header_size: int) -> int:
    count = 1
    for s in shape:
        count *= s
    return header_size + count * dtype.itemsize


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` by suffix or magic) into a native-endian numpy array.

    Raises :class:`DataError` naming the file for a missing, truncated, oversized or
    corrupt file, with the expected and actual sizes.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            magic = raw.read(2)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if magic == b"\x1f\x8b":
        return _read_gzip(path)
    data = path.read_bytes()
    dtype, shape, header_size = _parse_header(path, data[: 4 + 4 * 255])
    expected = _expected_size(dtype, shape, header_size)
    if expected != len(data):
        raise DataError(
            f"{path}: size mismatch: header {shape} of {dtype.name} needs {expected} bytes, file has {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _read_gzip(path: Path) -> np.ndarray:
    compressed_size = path.stat().st_size
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4)
            if len(head) == 4 and head[:2] == b"\x00\x00":
                head += f.read(4 * head[3])
            dtype, shape, header_size = _parse_header(path, head)
            expected = _expected_size(dtype, shape, header_size)
            # deflate cannot expand more than ~1032:1; anything beyond is a lie or a bomb
            if expected > MAX_BYTES or expected > 1100 * compressed_size + 1024:
                raise DataError(
                    f"{path}: IDX header announces {expected} bytes, impossible for a {compressed_size}-byte gzip file"
                )
            body = f.read(expected - header_size + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None
    actual = header_size + len(body)
    if actual != expected:
        more = " or more" if actual > expected else ""
        raise DataError(
            f"{path}: size mismatch: header {shape} of {dtype.name} needs {expected} bytes, "
            f"file has {actual}{more} (uncompressed)"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as IDX (gzip when ``compress`` or when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    code = _CODES[native]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_TYPES[code]).tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
