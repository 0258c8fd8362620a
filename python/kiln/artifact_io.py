"""The artifact container: one zip file, members stored uncompressed, every member checksummed.

Why a zip: one file to copy, upload or mount; every tool can list and extract it; members
are read in place (no unpacking step), and the weights member is a valid ``safetensors``
file that other tools read as it is (``unzip model.kiln weights.safetensors``). Stored,
not deflated: weights barely compress, and a stored member is read straight from disk into
the tensors that hold it (no decompression buffer, no second copy).

Writing is atomic: members go into a temporary file beside the destination, which is
renamed over it only once complete; anything that fails removes the temporary file.

Reading trusts nothing: member names must be plain relative paths (no absolute path, no
``..``), the manifest's CRC is checked, every other member's SHA-256 is checked against
the manifest before it is used (generated kernels before they are loaded), and each
tensor's CRC-32 against the weights index. The weights use CRC-32, not SHA-256: it finds
the same damage (truncation, flipped bytes) many times faster on the largest member,
and the manifest is not signed, so no checksum in it guards against a deliberate edit
anyway — trust in an artifact is trust in where it came from. Nothing here unpickles; the
formats are JSON and safetensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import _C
from .errors import KilnError
from kiln.ir.record import record

MANIFEST = "manifest.json"
ALIGN = 64  # bytes: where each weight starts in the file (what a fresh torch allocation has)
PAD = "__kiln_pad_"  # names of the safetensors entries that fill the gaps alignment leaves
_PADDING_RECORD = 0xD935  # the zip extra-field id Android's zipalign uses for its padding
# safetensors dtype names (https://github.com/huggingface/safetensors): the ones torch has
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_THREADED_BYTES = 32 << 20  # weights members from this size are checksummed on several threads
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not one Kiln wrote
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # a zip local file header (30 bytes)
# what zipfile raises on a damaged archive: a damaged compression-method field is
# NotImplementedError, a damaged flags field can claim encryption (RuntimeError)
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError,
               ValueError, zlib.error, struct.error)


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def crc32(data) -> str:
    """A tensor's checksum in the weights index: zlib's CRC-32, in hex. Computed by Kiln's
    carry-less-multiplication kernel (``kiln._C.crc32``: the same value, at memory speed
    where zlib's table loop was slower than reading the weights; releases the GIL)."""
    return f"{_C.crc32(data):08x}"


def check_member_name(name: str) -> None:
    """Reject member names that could escape the artifact when extracted: absolute paths,
    ``..`` or ``.`` parts, backslashes, drive letters, empty parts, NUL."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\0" in name or ":" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise KilnError(f"unsafe member name {name!r} in the artifact (absolute, or leaving its folder)")


def _bytes_of(t: torch.Tensor):
    """A contiguous tensor's memory as a flat uint8 numpy array (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


# ----------------------------------------------------------------------------- writing
@record(frozen=False, slots=False)
class _Member:
    """A zip member being written, and the file offset its data starts at."""
    info: zipfile.ZipInfo
    data: int  # the file offset its data will start at


class Writer:
    """``with Writer(path) as w: w.add(...); w.finish(manifest)``: the file appears at
    ``path`` only after ``finish``; an exception before then leaves nothing behind."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if os.path.isdir(self.path):
            raise KilnError(f"{self.path} is a directory; kiln.save writes one file")
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise KilnError(f"cannot save to {self.path}: folder {folder} does not exist")
        fd, self.tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
        self._file = os.fdopen(fd, "wb")
        self.zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        self.members: dict[str, dict] = {}  # name -> {"sha256", "bytes"}: the manifest's checksums

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None or self.tmp is not None:
            self.abort()
        return False

    def add(self, name: str, data: bytes) -> None:
        check_member_name(name)
        self.zip.writestr(name, data)
        self.members[name] = {"sha256": sha256(data), "bytes": len(data)}

    def add_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
        """Write ``tensors`` (contiguous) as a safetensors member, streamed tensor by tensor;
        returns the index the manifest keeps: name -> dtype, shape, CRC-32 of its bytes.

        Every tensor starts ``ALIGN``-byte aligned in the file, so a reader can map it in place
        with the alignment a fresh allocation has: the member's data starts aligned (a padding
        record in its zip header, as ``zipalign`` does), the safetensors header is padded with
        spaces to end aligned, and a gap before a tensor is a ``PAD``-named uint8 tensor
        (safetensors allows no unnamed gaps)."""
        check_member_name(name)
        start = self._aligned_member(name)
        header, order, offset, pads = {"__metadata__": {"format": "pt"}}, [], 0, 0
        for key, t in tensors.items():
            if t.dtype not in _ST_DTYPES:
                raise KilnError(f"weight {key!r} has dtype {t.dtype}, which safetensors cannot hold")
            if not t.is_contiguous():
                raise ValueError(f"weight {key!r} must be contiguous")
            if key.startswith(PAD):
                raise ValueError(f"weight names may not start with {PAD!r}")
            if offset % ALIGN:
                gap = ALIGN - offset % ALIGN
                pad = f"{PAD}{pads}"
                pads += 1
                header[pad] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
                order.append((pad, torch.zeros(gap, dtype=torch.uint8)))
                offset += gap
            n = t.numel() * t.element_size()
            header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            order.append((key, t))
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(start.data + 8 + len(text)) % ALIGN)  # the tensors' data starts aligned
        index = {}
        with self.zip.open(start.info, "w", force_zip64=True) as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for key, t in order:
                data = _bytes_of(t)
                f.write(data)
                if not key.startswith(PAD):
                    index[key] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                  "crc32": crc32(data)}
        self.members[name] = {"bytes": 8 + len(text) + offset}  # checked tensor by tensor (the index)
        return index

    def _aligned_member(self, name: str):
        """A ZipInfo for ``name`` whose data will start ``ALIGN``-aligned in the file, and where."""
        info = zipfile.ZipInfo(name, date_time=time.localtime(time.time())[:6])
        info.compress_type = zipfile.ZIP_STORED
        here = self._file.tell()
        # local header (30) + name + the padding record (4 + n) + the zip64 record force_zip64 adds (20)
        fixed = here + _LOCAL_HEADER.size + len(name.encode()) + 4 + 20
        n = -fixed % ALIGN
        info.extra = struct.pack("<HH", _PADDING_RECORD, n) + bytes(n)
        return _Member(info, fixed + n)

    def finish(self, manifest: dict) -> None:
        self.zip.writestr(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        self.zip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        self.tmp = None

    def abort(self) -> None:
        for close in (self.zip.close, self._file.close):
            try:
                close()
            except Exception:  # noqa: BLE001  (already failing: the temporary file goes regardless)
                pass
        if self.tmp is not None and os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self.tmp = None


# ----------------------------------------------------------------------------- reading
class Reader:
    """An artifact opened for reading: the member table checked, members read on demand."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise KilnError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise KilnError(f"{self.path} is a directory, not a Kiln artifact (kiln.save writes one .kiln file)")
        self.size = os.path.getsize(self.path)
        try:
            self._file = open(self.path, "rb", buffering=0)
            self.zip = zipfile.ZipFile(self._file)
        except _ZIP_ERRORS as e:
            self.close()
            raise KilnError(f"{self.path} is not a Kiln artifact, or it is truncated (not a readable zip: {e})") from None
        self.infos = {}
        for info in self.zip.infolist():
            check_member_name(info.filename)
            if info.filename in self.infos:
                raise KilnError(f"{self.path}: member {info.filename!r} appears twice")
            self.infos[info.filename] = info

    def close(self) -> None:
        for obj in (getattr(self, "zip", None), getattr(self, "_file", None)):
            if obj is not None:
                obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _info(self, name: str) -> zipfile.ZipInfo:
        info = self.infos.get(name)
        if info is None:
            raise KilnError(f"{self.path}: member {name!r} is missing")
        return info

    def manifest(self) -> dict:
        if MANIFEST not in self.infos:
            raise KilnError(f"{self.path} is not a Kiln artifact (a zip without {MANIFEST})")
        try:
            data = self.zip.read(MANIFEST)
        except _ZIP_ERRORS as e:
            raise KilnError(f"{self.path}: {MANIFEST} is corrupt or fails its checksum ({e})") from None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise KilnError(f"{self.path}: {MANIFEST} is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise KilnError(f"{self.path}: {MANIFEST} is not a JSON object")
        return doc

    def read(self, name: str, expect: dict) -> bytes:
        """Member ``name``, checked against ``expect`` (the manifest's sha256 and size)."""
        info = self._info(name)
        try:
            data = self.zip.read(info)
        except _ZIP_ERRORS as e:
            if "CRC" in str(e):
                raise KilnError(f"{self.path}: member {name!r} fails its checksum (CRC-32): the file was "
                                f"modified or damaged") from None
            raise KilnError(f"{self.path}: member {name!r} is corrupt or truncated ({e})") from None
        if len(data) != expect.get("bytes", len(data)) or sha256(data) != expect.get("sha256"):
            raise KilnError(f"{self.path}: member {name!r} fails its checksum (the file was modified or damaged)")
        return data

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes start in the file (after its local header)."""
        if info.compress_type != zipfile.ZIP_STORED:
            raise KilnError(f"{self.path}: member {info.filename!r} is compressed; Kiln stores weights uncompressed")
        head = os.pread(self._file.fileno(), _LOCAL_HEADER.size, info.header_offset)
        if len(head) != _LOCAL_HEADER.size:
            raise KilnError(f"{self.path} is truncated (member {info.filename!r})")
        fields = _LOCAL_HEADER.unpack(head)
        if fields[0] != b"PK\x03\x04":
            raise KilnError(f"{self.path}: member {info.filename!r} has a damaged header")
        name_len, extra_len = fields[9], fields[10]
        name = os.pread(self._file.fileno(), name_len, info.header_offset + _LOCAL_HEADER.size)
        if name.decode("utf-8", "replace") != info.filename:
            raise KilnError(f"{self.path}: member {info.filename!r} has a damaged header")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + info.file_size > self.size:
            raise KilnError(f"{self.path} is truncated: member {info.filename!r} runs past the end of the file")
        return start

    def _mapping(self) -> torch.Tensor:
        """The whole file as a uint8 tensor over a private mapping; the tensors cut from it
        keep it alive after the reader closes."""
        mm = mmap.mmap(self._file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        mm.madvise(mmap.MADV_WILLNEED)  # read ahead: the checksums touch every page next
        return torch.frombuffer(mm, dtype=torch.uint8)

    def _pread_into(self, buf, offset: int, what: str) -> None:
        view, done = memoryview(buf).cast("B"), 0
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n <= 0:
                raise KilnError(f"{self.path} is truncated (reading {what})")
            done += n

    def tensors(self, name: str, index: dict[str, dict], threads: int = 2, mapped: bool = True
                ) -> dict[str, torch.Tensor]:
        """The safetensors member ``name``'s tensors, every one checked against ``index`` (the
        manifest's dtype, shape and CRC-32 per name).

        ``mapped``: an aligned tensor is the file's own pages (a private, copy-on-write
        mapping: no copy, and processes that load the same file share the memory); else, or
        for a tensor the writer did not align, it is read into a fresh allocation."""
        info = self._info(name)
        start = self._data_offset(info)
        size = info.file_size
        if size < 8:
            raise KilnError(f"{self.path}: {name} is truncated")
        (hlen,) = struct.unpack("<Q", os.pread(self._file.fileno(), 8, start))
        if hlen > min(size - 8, _MAX_HEADER):
            raise KilnError(f"{self.path}: {name} has a damaged header")
        try:
            header = json.loads(os.pread(self._file.fileno(), hlen, start + 8))
        except (ValueError, UnicodeDecodeError):
            raise KilnError(f"{self.path}: {name} has a damaged header") from None
        if not isinstance(header, dict) or not all(isinstance(e, dict) for e in index.values()):
            raise KilnError(f"{self.path}: {name} has a damaged header, or the manifest a damaged weights index")
        header = {k: v for k, v in header.items() if k != "__metadata__" and not k.startswith(PAD)}
        if set(header) != set(index):
            extra, missing = sorted(set(header) - set(index)), sorted(set(index) - set(header))
            raise KilnError(f"{self.path}: {name} does not hold the weights the manifest lists "
                            f"(missing {missing[:5]}, unexpected {extra[:5]})")
        base, end = start + 8 + hlen, start + size
        buf = self._mapping() if mapped else None
        out: dict[str, torch.Tensor] = {}
        # checksums on worker threads (the CRC releases the GIL) only where there is enough to
        # share: starting the threads costs more than checking a small model's weights
        if size < _THREADED_BYTES:
            threads = 1
        with ThreadPoolExecutor(max_workers=max(1, threads)) if threads > 1 else _Inline() as pool:
            jobs = []
            for key, entry in sorted(header.items(), key=_start):
                dtype, shape = _entry_type(self.path, name, key, entry, index[key])
                n = math.prod(shape) * dtype.itemsize
                offsets = entry.get("data_offsets")
                b, e = offsets if isinstance(offsets, list) and len(offsets) == 2 else (None, None)
                if not (isinstance(b, int) and isinstance(e, int) and 0 <= b <= e and base + e <= end and e - b == n):
                    raise KilnError(f"{self.path}: weight {key!r} has damaged offsets in {name}")
                if buf is not None and n and (base + b) % ALIGN == 0:
                    t = buf[base + b:base + e].view(dtype).view(shape)
                else:
                    t = torch.empty(shape, dtype=dtype)
                    if n:
                        self._pread_into(_bytes_of(t), base + b, f"weight {key!r}")
                jobs.append((key, pool.submit(crc32, _bytes_of(t))))
                out[key] = t
            for key, job in jobs:
                if job.result() != index[key].get("crc32"):
                    raise KilnError(f"{self.path}: weight {key!r} fails its checksum (the file was modified or damaged)")
        return out


class _Inline:
    """The part of ThreadPoolExecutor ``tensors`` uses, running each job at once in the caller."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        f = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001  (re-raised by result(), as a pool's future does)
            f.set_exception(e)
        return f


def _start(item) -> int:
    """Where a header entry's data starts, for reading in file order (damage is reported later)."""
    offsets = item[1].get("data_offsets") if isinstance(item[1], dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and isinstance(offsets[0], int) else 0


def _entry_type(path, member, key, entry, expect) -> tuple[torch.dtype, list]:
    dtype = _TORCH_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise KilnError(f"{path}: weight {key!r} has a damaged entry in {member}")
    if str(dtype).removeprefix("torch.") != expect.get("dtype") or shape != expect.get("shape"):
        raise KilnError(f"{path}: weight {key!r} is {str(dtype).removeprefix('torch.')} {shape} in {member}, "
                        f"but the manifest lists {expect.get('dtype')} {expect.get('shape')}")
    return dtype, shape
