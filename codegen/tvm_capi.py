"""Exported TVM modules loaded and called through the TVM FFI's C ABI, with ctypes.

The ``tvm_ffi`` Python package costs most of a second to import (it imports ``ml_dtypes``,
whose NumPy type registration dominates), which is more than loading a whole artifact
otherwise takes. Running an exported module needs none of it: ``libtvm_ffi`` and
``libtvm_runtime`` (loaded by path, the same files the package would load), the global
functions ``ffi.ModuleLoadFromFile`` and ``ffi.ModuleGetFunction``, and
``TVMFFIFunctionCall`` with ``DLTensor`` pointers. Layouts follow ``tvm/ffi/c_api.h``
(``TVMFFIAny``, ``TVMFFIObject``, ``TVMFFIErrorCell``) and ``dlpack.h`` (``DLTensor``).

Mixing with the package is safe: importing ``tvm_ffi`` later loads the same libraries.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from ctypes import POINTER, Structure, byref, c_char_p, c_int32, c_int64, c_size_t, c_uint8, c_uint16, c_uint32, \
    c_uint64, c_void_p

import torch

# TVMFFITypeIndex values used here
_NONE, _INT, _BOOL, _DLTENSOR_PTR, _RAW_STR, _FUNCTION = 0, 1, 2, 7, 8, 68
_OBJECT_BEGIN = 64
_OBJECT_HEADER = 24  # TVMFFIObject: ref counts (8), type index (4), padding (4), deleter (8)


class _Any(Structure):  # TVMFFIAny: 16 bytes
    _fields_ = [("type_index", c_int32), ("zero_padding", c_uint32), ("v", c_uint64)]


class _ByteArray(Structure):  # TVMFFIByteArray
    _fields_ = [("data", c_void_p), ("size", c_size_t)]


class _Device(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class _DType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class _DLTensor(Structure):
    _fields_ = [("data", c_void_p), ("device", _Device), ("ndim", c_int32), ("dtype", _DType),
                ("shape", POINTER(c_int64)), ("strides", POINTER(c_int64)), ("byte_offset", c_uint64)]


# DLPack type codes: kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLBool 6
_DTYPES = {torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16), torch.bfloat16: (4, 16),
           torch.int64: (0, 64), torch.int32: (0, 32), torch.int16: (0, 16), torch.int8: (0, 8),
           torch.uint8: (1, 8), torch.bool: (6, 8)}
_KDLCPU = 1

_lib = None
_lock = threading.Lock()


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed")
    return list(spec.submodule_search_locations)[0]


def library():
    """``libtvm_ffi`` with its C API typed, ``libtvm_runtime`` loaded beside it (both global:
    exported modules resolve their runtime symbols from them). Raises ImportError when TVM
    is not installed."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(os.path.join(_package_dir("tvm_ffi"), "lib", "libtvm_ffi.so"), mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(os.path.join(_package_dir("tvm"), "lib", "libtvm_runtime.so"), mode=ctypes.RTLD_GLOBAL)
            lib.TVMFFIFunctionGetGlobal.argtypes = [POINTER(_ByteArray), POINTER(c_void_p)]
            lib.TVMFFIFunctionGetGlobal.restype = c_int32
            lib.TVMFFIFunctionCall.argtypes = [c_void_p, POINTER(_Any), c_int32, POINTER(_Any)]
            lib.TVMFFIFunctionCall.restype = c_int32
            lib.TVMFFIErrorMoveFromRaised.argtypes = [POINTER(c_void_p)]
            lib.TVMFFIErrorMoveFromRaised.restype = None
            lib.TVMFFIObjectDecRef.argtypes = [c_void_p]
            lib.TVMFFIObjectDecRef.restype = c_int32
            _lib = lib
    return _lib


def _raised() -> RuntimeError:
    """The error the last failing call raised, as a Python exception (kind: message)."""
    lib = library()
    err = c_void_p()
    lib.TVMFFIErrorMoveFromRaised(byref(err))
    if not err.value:
        return RuntimeError("TVM call failed")
    cell = _ByteArray.from_address(err.value + _OBJECT_HEADER), _ByteArray.from_address(err.value + _OBJECT_HEADER + 16)
    kind, message = (ctypes.string_at(b.data, b.size).decode("utf-8", "replace") if b.data else "" for b in cell)
    lib.TVMFFIObjectDecRef(err)
    return RuntimeError(f"{kind}: {message}")


def _global(name: str) -> int:
    b = name.encode()
    handle = c_void_p()
    if library().TVMFFIFunctionGetGlobal(byref(_ByteArray(ctypes.cast(c_char_p(b), c_void_p), len(b))),
                                         byref(handle)) != 0:
        raise _raised()
    if not handle.value:
        raise RuntimeError(f"TVM global function {name} is not registered")
    return handle.value


def _call(func: int, *args: _Any) -> _Any:
    arr = (_Any * max(1, len(args)))(*args)
    out = _Any(_NONE, 0, 0)
    if library().TVMFFIFunctionCall(func, arr, len(args), byref(out)) != 0:
        raise _raised()
    return out


def _str(b: bytes) -> _Any:  # the bytes must outlive the call
    return _Any(_RAW_STR, 0, ctypes.cast(c_char_p(b), c_void_p).value)


def config_threadpool(threads: int) -> None:
    """TVM's ``runtime.config_threadpool(1, threads)``: its pool sized, threads unpinned."""
    _call(_global("runtime.config_threadpool"), _Any(_INT, 0, 1), _Any(_INT, 0, threads))


class ExportedFunction:
    """A function of an exported module, called as ``fn(*tensors)`` with CPU torch tensors.

    The module stays loaded for the life of the process (it is never released), as
    ``tvm_ffi.load_module`` keeps it. Each calling thread keeps its own argument structures
    (a tensor's ``DLTensor`` is rebuilt only when its shape or dtype changes), since the
    call runs without the GIL."""

    def __init__(self, path: str, name: str = "main"):
        p, n = os.fspath(path).encode(), name.encode()
        module = _call(_global("ffi.ModuleLoadFromFile"), _str(p))
        if module.type_index < _OBJECT_BEGIN:
            raise RuntimeError(f"{path} did not load as a TVM module")
        fn = _call(_global("ffi.ModuleGetFunction"), _Any(module.type_index, 0, module.v), _str(n), _Any(_BOOL, 0, 1))
        if fn.type_index != _FUNCTION or not fn.v:
            raise RuntimeError(f"{path} has no function {name!r}")
        self.path, self._module, self._fn = os.fspath(path), module, fn.v
        self._local = threading.local()

    def __call__(self, *tensors):
        frame = self._local.__dict__.get(len(tensors))
        if frame is None:
            frame = self._local.__dict__[len(tensors)] = _Frame(self._fn, len(tensors))
        descs, data = frame.descs, frame.data
        for i, t in enumerate(tensors):
            if descs[i] != (t.shape, t.dtype) or not t.is_contiguous():
                frame.describe(i, t)
            data[i * _DL_WORDS] = t.data_ptr()
        if frame.call() != 0:
            raise _raised()


_DL_WORDS = ctypes.sizeof(_DLTensor) // 8  # DLTensor.data is its first word
_CALL = ctypes.CFUNCTYPE(c_int32, c_void_p, c_void_p, c_int32, c_void_p)


class _Frame:
    """One thread's arguments for a function of ``n`` tensors: the DLTensors side by side,
    their data pointers written through a uint64 view, the call's arguments bound once."""

    def __init__(self, fn: int, n: int):
        self.tensors = (_DLTensor * max(1, n))()
        self.data = memoryview(self.tensors).cast("B").cast("Q")
        self.args = (_Any * max(1, n))()
        for i in range(n):
            self.args[i].type_index, self.args[i].v = _DLTENSOR_PTR, ctypes.addressof(self.tensors[i])
        self.descs: list = [None] * n
        self.shapes: list = [None] * n
        self.out = _Any(_NONE, 0, 0)
        fn_call = _CALL(ctypes.cast(library().TVMFFIFunctionCall, c_void_p).value)
        self.call = functools.partial(fn_call, fn, ctypes.addressof(self.args), n, ctypes.addressof(self.out))

    def describe(self, i: int, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError("generated kernels take contiguous tensors")
        if t.device.type != "cpu" or t.dtype not in _DTYPES:
            raise TypeError(f"generated kernels take CPU tensors of {sorted(map(str, _DTYPES))}, "
                            f"got {t.dtype} on {t.device}")
        code, bits = _DTYPES[t.dtype]
        shape = (c_int64 * max(1, t.dim()))(*t.shape)
        d = self.tensors[i]
        d.device, d.ndim, d.dtype, d.shape, d.strides, d.byte_offset = _Device(_KDLCPU, 0), t.dim(), \
            _DType(code, bits, 1), shape, None, 0
        self.shapes[i], self.descs[i] = shape, (t.shape, t.dtype)

