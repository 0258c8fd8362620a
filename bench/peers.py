"""The reduced-precision peers of the model benchmarks, built as their users ship them.

- ``openvino`` / ``openvino_bf16``: OpenVINO's CPU plugin with ``INFERENCE_PRECISION_HINT``
  set (``f32`` or ``bf16``; its default on an AMX machine is bf16, so an fp32 comparison must
  say ``f32``).
- ``openvino_int8``: NNCF post-training quantization (``nncf.quantize``, ``ModelType.TRANSFORMER``
  for Transformer models) on ``CALIBRATION_N`` seeded calibration inputs, compiled with the
  plugin's default precision for the rest (bf16 on AMX), as a user ships it.
- ``inductor_bf16``: the model's weights in bfloat16, ``torch.compile`` with freezing, the
  float inputs cast to bfloat16 on the way in.

OpenVINO and NNCF are benchmark-only dependencies: Kiln itself never imports them, and an
engine whose package is missing is reported as failed by the benchmark, not fatal.
"""
from __future__ import annotations

import contextlib
import copy
import io

import torch

CALIBRATION_N = 10
TRANSFORMERS = ("bert", "hf_bert")


def calibration_inputs(inputs: tuple, n: int = CALIBRATION_N, seed: int = 1) -> list[tuple]:
    """``n`` seeded inputs shaped like ``inputs``: float tensors drawn from N(0, 1), integer
    tensors that hold ids (any value above 1) drawn from [0, max]; 0/1 masks kept as given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = []
        for t in inputs:
            if t.is_floating_point():
                batch.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
            elif t.numel() and int(t.max()) > 1:
                batch.append(torch.randint(0, int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype))
            else:
                batch.append(t.clone())
        out.append(tuple(batch))
    return out


def _ov_convert(model, inputs):
    import openvino as ov

    with torch.no_grad():
        return ov.convert_model(model, example_input=tuple(inputs))


def _ov_compile(ov_model, threads: int, precision: str | None):
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              # pinning would bind the calling thread to a core, under the other engines too
              "ENABLE_CPU_PINNING": False}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()

    def run(*args):
        # share_inputs: the tensors' memory is read in place, as a user's zero-copy call would
        return request.infer([a.numpy() for a in args], share_inputs=True)[0]
    return run


def openvino(model, inputs, threads: int, precision: str = "f32"):
    """OpenVINO at ``precision`` ("f32" or "bf16")."""
    return _ov_compile(_ov_convert(model, inputs), threads, precision)


def openvino_int8(model, inputs, threads: int, name: str, calibration: list[tuple] | None = None):
    """NNCF post-training int8 quantization on the calibration inputs, then OpenVINO with its
    default precision for the non-quantized rest."""
    import nncf

    ov_model = _ov_convert(model, inputs)
    cal = calibration if calibration is not None else calibration_inputs(inputs)
    dataset = nncf.Dataset(cal, lambda batch: [t.numpy() for t in batch])
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if name in TRANSFORMERS else {}
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bars, not the benchmark's output
        q = nncf.quantize(ov_model, dataset, subset_size=len(cal), **kwargs)
    return _ov_compile(q, threads, None)


def inductor_bf16(model, inputs):
    """bf16 weights, Inductor with freezing; float inputs cast to bf16 in the call."""
    import torch._inductor.config as cfg

    cfg.freezing = True
    torch._dynamo.reset()
    m = copy.deepcopy(model).to(torch.bfloat16)
    fn = torch.compile(m)

    def run(*args):
        return fn(*[a.to(torch.bfloat16) if a.is_floating_point() else a for a in args])
    with torch.no_grad():
        run(*inputs)  # compile happens on the first call
    return run
