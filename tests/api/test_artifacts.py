"""kiln.save / kiln.load: round trips (in a fresh process, bitwise), several specializations,
no measuring at load, portability to a CPU with fewer features, and every kind of bad file."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import kiln
from kiln import KilnError, KilnWarning
from kiln.artifact import FORMAT_VERSION
from kiln.target import Target, host_cpu


class Tiny(nn.Module):
    """A linear (a library kernel), an elementwise tail and a LayerNorm (a generated kernel
    group), and structured outputs with a constant leaf."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x, scale):
        h = self.fc(x)
        y = self.norm(torch.tanh(h) * scale + 1.0)
        return {"y": y, "pair": (y.sum(-1), 3)}


def _tiny(batch=4):
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(batch, 16), torch.randn(batch, 32))


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _bitwise(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """(path, inputs, outputs of the compiled model) for Tiny, compiled with its generated group."""
    model, inputs = _tiny()
    compiled = kiln.compile(model, inputs)
    path = str(tmp_path_factory.mktemp("art") / "tiny.kiln")
    compiled.save(path)
    with torch.no_grad():
        return path, inputs, compiled(*inputs), compiled


# ----------------------------------------------------------------------------- round trips
def test_round_trip_same_process(tiny_artifact):
    path, inputs, out, compiled = tiny_artifact
    loaded = kiln.load(path)
    assert isinstance(loaded, kiln.CompiledModel)
    got = loaded(*inputs)
    assert _bitwise(got, out) and got["pair"][1] == 3
    assert loaded.report.artifact == path and not loaded.report.rechosen
    assert loaded.report.kernels == compiled.report.kernels


def test_winograd_round_trip_maps_the_transformed_weights(tmp_path, monkeypatch):
    """A 3x3 conv that runs Winograd F(4x4) (forced: oneDNN excluded): its transformed
    weights (portable: Kiln's own arithmetic) are stored beside the weights and mapped at
    load, not computed again — bitwise what the compile computed. Stored ones of another
    transform version are computed again instead."""
    import kiln.kernels.winograd as W

    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")  # no timing: Winograd is the first candidate left
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 8, 20, 20)
    compiled = kiln.compile(model, (x,), exclude_kernels=["cpu.onednn_conv", "cpu.winograd2_conv"])
    if compiled.report.kernels.get("cpu.winograd4_conv") != 2:
        pytest.skip("Winograd needs AVX-512 or AVX2 + FMA (kiln._C.winograd_supported())")
    path = str(tmp_path / "wino.kiln")
    compiled.save(path)
    derived = kiln.artifact.info(path)["plans"][0]["derived"]
    assert [(d["kernel"], d["version"], d["input"]) for d in derived] == [("cpu.winograd4_conv", 1, 1)] * 2
    from kiln.artifact_cli import describe

    assert "of which prepacked by kernels: 2 tensors" in describe(path)  # kiln info
    with torch.no_grad():
        expected = compiled(x)

    original = W.transform_weight

    def no_transform(w, m):
        raise AssertionError("the shipped transformed weights were not used")
    monkeypatch.setattr(W, "transform_weight", no_transform)
    loaded = kiln.load(path)
    assert loaded.report.kernels == compiled.report.kernels
    with torch.no_grad():
        assert _bitwise(loaded(x), expected)
    again_path = str(tmp_path / "again.kiln")  # a loaded model saved again ships them again
    loaded.save(again_path)
    assert len(kiln.artifact.info(again_path)["plans"][0]["derived"]) == 2
    with torch.no_grad():
        assert _bitwise(kiln.load(again_path)(x), expected)

    calls = []
    monkeypatch.setattr(W, "transform_weight", lambda w, m: calls.append(m) or original(w, m))
    monkeypatch.setattr(W, "TRANSFORM_VERSION", 2)
    again = kiln.load(path)
    assert calls == [4, 4]
    with torch.no_grad():
        assert _bitwise(again(x), expected)
    _load_each_damaged(path, str(tmp_path / "damaged.kiln"),
                       [["plans", 0, "derived", 0, k] for k in ("kernel", "version", "node", "input", "tensor")], (x,))


def test_bf16_winograd_round_trip_maps_its_bf16_transformed_weights(tmp_path, monkeypatch):
    """precision="bf16": the bf16 F(2x2) kernel's transformed weights (bf16) ship and map at
    load as fp32's do; the loaded model is bitwise the compiled one."""
    import kiln.kernels.winograd as W
    from kiln import _C

    if not _C.winograd_bf16_supported():
        pytest.skip("the bf16 Winograd kernel needs AVX512-BF16")
    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")  # no timing: Winograd is the first candidate left
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 8, 20, 20)
    compiled = kiln.compile(model, (x,), precision="bf16", exclude_kernels=["cpu.onednn_conv"], codegen=False)
    assert compiled.report.kernels.get("cpu.winograd2_conv_bf16") == 2, compiled.report.accuracy
    path = str(tmp_path / "wino_bf16.kiln")
    compiled.save(path)
    derived = kiln.artifact.info(path)["plans"][0]["derived"]
    assert [(d["kernel"], d["version"], d["input"]) for d in derived] == [("cpu.winograd2_conv_bf16", 1, 1)] * 2
    with torch.no_grad():
        expected = compiled(x)

    def no_transform(w, m):
        raise AssertionError("the shipped transformed weights were not used")
    monkeypatch.setattr(W, "transform_weight", no_transform)
    with torch.no_grad():
        assert _bitwise(kiln.load(path)(x), expected)


def test_load_freezes_the_collected_heap_only_when_asked(tiny_artifact):
    import gc

    path, inputs, out, _ = tiny_artifact
    gc.unfreeze()
    try:
        kiln.load(path, freeze_gc=False)
        assert gc.get_freeze_count() == 0
        loaded = kiln.load(path)  # default: what is alive now leaves the collector's generations
        assert gc.get_freeze_count() > 0
        assert _bitwise(loaded(*inputs), out)
    finally:
        gc.unfreeze()


def test_the_weights_member_is_a_safetensors_file(tiny_artifact):
    from safetensors.torch import load as st_load

    path, *_ = tiny_artifact
    with zipfile.ZipFile(path) as z:
        tensors = st_load(z.read("weights.safetensors"))
        manifest = json.loads(z.read("manifest.json"))
    assert {k for k in tensors if not k.startswith("__kiln_pad_")} == set(manifest["weights"]["tensors"])
    assert manifest["format_version"] == FORMAT_VERSION and manifest["target"]["features"] == sorted(host_cpu().features)


def test_weights_are_aligned_and_mapped_in_place(tiny_artifact):
    from kiln.artifact_io import Reader

    path, inputs, out, _ = tiny_artifact
    with Reader(path) as r:
        index = r.manifest()["weights"]["tensors"]
        mapped = r.tensors("weights.safetensors", index)
        copied = r.tensors("weights.safetensors", index, mapped=False)
    storages = {t.untyped_storage().data_ptr() for t in mapped.values()}
    assert len(storages) == 1  # every tensor is a view of the one file mapping
    assert all(t.data_ptr() % 64 == 0 for t in mapped.values())
    assert all(torch.equal(mapped[k], copied[k]) for k in index)
    assert _bitwise(kiln.load(path, map_weights=False)(*inputs), out)


_FRESH = r"""
import sys, torch, kiln
from safetensors.torch import load_file, save_file
for path, io in zip(sys.argv[1::2], sys.argv[2::2]):
    m = kiln.load(path)
    d = load_file(io)
    ins = [d[f"in{i}"] for i in range(sum(k.startswith("in") for k in d))]
    with torch.no_grad():
        out = m(*ins)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    save_file({f"out{i}": t.contiguous() for i, t in enumerate(leaves)}, io + ".out")
# what loading needed: no exporter, no passes, no code generators (nor TVM's Python packages: the
# runtime library is called through its C ABI), no model classes
bad = [m for m in ("tvm", "tvm_ffi", "triton", "kiln.frontends.torch_export", "kiln.passes.pipeline",
                   "kiln.models", "transformers") if m in sys.modules]
assert not bad, bad
"""


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval(), (torch.randn(8, 256),)


_SMALL_BERT = dict(layers=1, hidden=64, heads=2, seq=16, vocab=100)
# (label, model factory, compile options): each family, each precision, each weight format
_FAMILIES = [
    ("bert", lambda: kiln.models.get("bert", **_SMALL_BERT), {}),
    ("resnet18", lambda: kiln.models.get("resnet18", image=32, num_classes=10), {}),
    ("lstm", lambda: kiln.models.get("lstm", batch=4, seq=8), {}),
    ("bert_bf16", lambda: kiln.models.get("bert", **_SMALL_BERT), dict(precision="bf16")),
    ("bert_int8_dynamic", lambda: kiln.models.get("bert", **_SMALL_BERT), dict(quantize="int8-dynamic")),
    ("mlp_int8_static", _mlp, dict(quantize="int8-static", calibration=[_mlp()[1]])),
    ("mlp_int4_weight", _mlp, dict(quantize="int4-weight", group_size=32)),
    ("mlp_bsr", lambda: (kiln.sparsify(_mlp()[0], 0.9, "block(4,4)"), _mlp()[1]), dict(sparse="bsr")),
]


def test_round_trip_in_a_fresh_process_is_bitwise(tmp_path, tiny_artifact):
    """Each model family, precision and weight format, saved here and loaded in a new
    process that imports only kiln: the outputs are bitwise those of the saved model."""
    from safetensors.torch import load_file, save_file

    cases = [("tiny", tiny_artifact[2], tiny_artifact[0], tiny_artifact[1])]
    for name, factory, options in _FAMILIES:
        model, inputs = factory()
        compiled = kiln.compile(model, inputs, **options)
        path = str(tmp_path / f"{name}.kiln")
        kiln.save(compiled, path)
        with torch.no_grad():
            cases.append((name, compiled(*inputs), path, inputs))
    argv = []
    for name, out, path, inputs in cases:
        io = str(tmp_path / f"{name}.io")
        save_file({f"in{i}": t for i, t in enumerate(inputs)}, io)
        argv += [path, io]
    r = subprocess.run([sys.executable, "-c", _FRESH, *argv], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, out, path, inputs in cases:
        got = load_file(str(tmp_path / f"{name}.io.out"))
        want = _leaves(out)
        assert len(got) == len(want), name
        for i, t in enumerate(want):
            assert torch.equal(got[f"out{i}"], t), f"{name}: output {i} differs after loading in a new process"


def test_quantized_and_sparse_formats_are_recorded(tmp_path):
    model, inputs = _mlp()
    sparse = kiln.compile(kiln.sparsify(model, 0.9, "block(4,4)"), inputs, sparse="bsr")
    kiln.save(sparse, str(tmp_path / "s.kiln"))
    loaded = kiln.load(str(tmp_path / "s.kiln"))
    assert [d.format for d in loaded.report.sparsity] == [d.format for d in sparse.report.sparsity]
    assert any(d.format.startswith("bsr") for d in loaded.report.sparsity)
    quant = kiln.compile(model, inputs, quantize="int4-weight", group_size=32)
    kiln.save(quant, str(tmp_path / "q.kiln"))
    loaded = kiln.load(str(tmp_path / "q.kiln"))
    assert loaded.options.quantize.scheme == "int4-weight" and loaded.options.quantize.group_size == 32
    assert [d.quantized for d in loaded.report.quantization] == [d.quantized for d in quant.report.quantization]


def test_cli_compile_info_run_dump(tmp_path, monkeypatch, capsys):
    import numpy as np

    from kiln.cli import main

    (tmp_path / "artifact_models.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "def small():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval(), (torch.randn(2, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = str(tmp_path / "small.kiln")
    assert main(["compile", "artifact_models:small", "-o", out, "--quantize", "int8-dynamic"]) == 0
    assert main(["info", out]) == 0
    text = capsys.readouterr().out
    assert "Kiln artifact format" in text and "float32[2, 8]" in text and "int8-dynamic" in text
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", out, "-i", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]) == 0
    with torch.no_grad():
        want = kiln.load(out)(torch.from_numpy(x))
    assert np.array_equal(np.load(tmp_path / "y.npy"), want.numpy())
    assert main(["dump", out]) == 0
    assert "linear" in capsys.readouterr().out
    assert main(["run", out]) == 2  # no inputs: a KilnError, reported
    assert "compiled for 1 input" in capsys.readouterr().err


def test_several_specializations_share_their_weights(tmp_path):
    model, (x, s) = _tiny(batch=4)
    compiled = kiln.compile(model)
    with torch.no_grad():
        outs = [compiled(x, s), compiled(x[:2], s[:2])]
    path = str(tmp_path / "two.kiln")
    kiln.save(compiled, path)
    manifest = kiln.artifact.info(path)
    assert len(manifest["plans"]) == 2
    # fc.weight, fc.bias, norm.weight, norm.bias (and any folded constant) once, not per plan
    consts = len(compiled.compiled[0].graph.constants)
    assert len(manifest["weights"]["tensors"]) <= consts
    loaded = kiln.load(path)
    assert _bitwise(loaded(x, s), outs[0]) and _bitwise(loaded(x[:2], s[:2]), outs[1])
    with pytest.raises(KilnError, match="cannot compile new shapes"):
        loaded(x[:3], s[:3])


def test_keyword_inputs_an_onnx_model_and_another_thread_count(tmp_path):
    from onnx import TensorProto, helper

    model, (x, s) = _tiny()
    compiled = kiln.compile(model, (x,), {"scale": s}, codegen=False)
    kiln.save(compiled, str(tmp_path / "kw.kiln"))
    loaded = kiln.load(str(tmp_path / "kw.kiln"))
    ref = compiled(x, scale=s)
    assert _bitwise(loaded(x, scale=s), ref)
    with pytest.raises(KilnError, match="compiled for 2 input"):
        loaded(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)  # the plan saved for another thread count runs
    try:  # (kernels may split their sums differently at another thread count: close, not bitwise)
        torch.testing.assert_close(loaded(x, scale=s)["y"], ref["y"], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Tanh", ["a"], ["t"]), helper.make_node("Add", ["t", "a"], ["y"])],
                          "tiny", [a], [y])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    xa = torch.randn(2, 3)
    fast = kiln.compile(proto, (xa,))
    kiln.save(fast, str(tmp_path / "onnx.kiln"))
    loaded = kiln.load(str(tmp_path / "onnx.kiln"))
    assert torch.equal(loaded(xa), fast(xa)) and kiln.artifact.info(str(tmp_path / "onnx.kiln"))["source"] == "onnx"


def test_saving_a_cuda_model_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU()).eval()
    fast = kiln.compile(model, (torch.randn(4, 16),), target="cuda:sm_90")  # built ahead, no GPU needed
    with pytest.raises(KilnError, match="saving cuda models is not supported yet"):
        kiln.save(fast, str(tmp_path / "c.kiln"))
    assert not os.listdir(tmp_path)


def test_tied_weights_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model, x = Tied().eval(), torch.randn(2, 8)
    compiled = kiln.compile(model, (x,), codegen=False)
    path = str(tmp_path / "tied.kiln")
    kiln.save(compiled, path)
    index = kiln.artifact.info(path)["weights"]["tensors"]
    shapes = sorted(tuple(r["shape"]) for r in index.values())
    assert shapes.count((8, 8)) == 1, index
    assert _bitwise(kiln.load(path)(x), compiled(x))


def test_loading_measures_nothing_and_generates_nothing(tiny_artifact, monkeypatch):
    import kiln.kernels.choice as choice
    import kiln.runtime.generated as generated
    import kiln.runtime.module_cache as module_cache

    def forbidden(*a, **k):
        raise AssertionError("kiln.load measured or generated a kernel")

    for mod, name in [(choice, "best_seconds"), (choice, "choose_group"), (generated, "generated_kernel"),
                      (module_cache, "build_and_store"), (module_cache, "build_in_memory")]:
        monkeypatch.setattr(mod, name, forbidden)
    path, inputs, out, _ = tiny_artifact
    assert _bitwise(kiln.load(path)(*inputs), out)


def test_save_needs_a_compiled_model(tmp_path):
    model, inputs = _tiny()
    with pytest.raises(KilnError, match="not been compiled yet"):
        kiln.save(kiln.compile(model), str(tmp_path / "x.kiln"))
    with pytest.raises(KilnError, match="takes what kiln.compile returns"):
        kiln.save(model, str(tmp_path / "x.kiln"))
    with pytest.raises(KilnError, match="is a directory"):
        kiln.save(kiln.compile(model, inputs, codegen=False), str(tmp_path))


def test_a_failed_save_leaves_no_file_and_keeps_the_old_one(tmp_path, tiny_artifact, monkeypatch):
    from kiln import artifact_io

    _, inputs, _, compiled = tiny_artifact
    path = tmp_path / "m.kiln"
    path.write_bytes(b"the previous artifact")

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(artifact_io.Writer, "add_tensors", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        compiled.save(str(path))
    assert path.read_bytes() == b"the previous artifact"
    assert sorted(os.listdir(tmp_path)) == ["m.kiln"]  # no temporary file left behind
    monkeypatch.undo()
    compiled.save(str(tmp_path / "new.kiln"))
    assert sorted(os.listdir(tmp_path)) == ["m.kiln", "new.kiln"]


# ----------------------------------------------------------------------------- portability
def _fewer_features(*drop) -> Target:
    h = host_cpu()
    return Target("cpu", h.arch, h.features - set(drop), h.cores)


def test_generated_kernels_are_rechosen_on_a_cpu_without_their_features(tiny_artifact, monkeypatch):
    path, inputs, out, compiled = tiny_artifact
    assert any(k.startswith("tvm.group.") for k in compiled.report.kernels), "the fixture needs a generated kernel"
    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")  # the re-choice: no timing in tests
    from kiln.target import host_cpu

    # a feature this CPU has, so the smaller target really lacks one the modules were built with
    drop = next(f for f in ("avx512_fp16", "avx512f", "avx2", "fma") if f in host_cpu().features)
    smaller = _fewer_features(drop)
    with pytest.warns(KilnWarning, match="chosen again"):
        loaded = kiln.load(path, target=smaller)
    assert not any(k.startswith("tvm.group.") for k in loaded.report.kernels)
    assert loaded.report.rechosen and all("generated module" in why for _, _, why in loaded.report.rechosen)
    torch.testing.assert_close(loaded(*inputs)["y"], out["y"], rtol=1e-4, atol=1e-4)
    with pytest.raises(KilnError, match=drop):
        kiln.load(path, target=smaller, strict=True)


def test_rebuild_kernels_builds_the_same_code_again(tiny_artifact, tmp_path, monkeypatch):
    path, inputs, out, _ = tiny_artifact
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))  # an empty module cache: every kernel is built
    loaded = kiln.load(path, rebuild_kernels=True)
    assert _bitwise(loaded(*inputs), out)
    assert os.listdir(tmp_path / "compile" / "tvm")


def test_an_amx_kernel_is_rechosen_on_a_cpu_without_amx(tmp_path, monkeypatch):
    from kiln.ir import OpKind
    from kiln.kernels.registry import all_kernels

    from kiln import _C

    if not _C.rnn_amx_supported():
        pytest.skip("this CPU has no AMX-BF16")
    model, inputs = kiln.models.get("lstm", batch=4, seq=8, hidden=32)
    others = sorted(k.name for k in all_kernels() if k.op is OpKind.LSTM and k.target == "cpu"
                    and k.name != "cpu.lstm_layer_amx")
    monkeypatch.setenv("KILN_KERNEL_CHOICE", "first")
    compiled = kiln.compile(model, inputs, precision="bf16", exclude_kernels=others, codegen=False)
    assert compiled.report.kernels.get("cpu.lstm_layer_amx")
    path = str(tmp_path / "lstm_bf16.kiln")
    compiled.save(path)
    no_amx = _fewer_features("amx_tile", "amx_bf16", "amx_int8")
    with pytest.raises(KilnError, match=r"cpu\.lstm_layer_amx.*amx_bf16"):
        kiln.load(path, target=no_amx, strict=True)
    with pytest.warns(KilnWarning):
        loaded = kiln.load(path, target=no_amx)
    assert "cpu.lstm_layer_amx" not in loaded.report.kernels
    assert [k for _, k, _ in loaded.report.rechosen] == ["cpu.lstm_layer_amx"] * compiled.report.kernels[
        "cpu.lstm_layer_amx"]
    with torch.no_grad():
        ref = compiled(*inputs)
        got = loaded(*inputs)
    assert float((got - ref).abs().max()) <= 2e-2 * max(1.0, float(ref.abs().max()))
    assert _bitwise(kiln.load(path)(*inputs), ref)  # on this CPU: the AMX kernel again


# ----------------------------------------------------------------------------- bad files
def _rewrite(src: str, dst: str, replace: dict | None = None, drop=(), manifest=None, extra: dict | None = None):
    """Copy the artifact ``src`` to ``dst`` with members replaced, dropped or added, and the
    manifest passed through ``manifest(doc)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = (replace or {}).get(info.filename, zin.read(info.filename))
            if info.filename == "manifest.json" and manifest is not None:
                doc = json.loads(data)
                manifest(doc)
                data = json.dumps(doc).encode()
            zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def _member_offset(path: str, name: str) -> int:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, e = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + n + e


def _flip(src: str, dst: str, offset: int) -> str:
    data = bytearray(open(src, "rb").read())
    data[offset] ^= 0x40
    open(dst, "wb").write(bytes(data))
    return dst


def _kernel_member(path: str) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.startswith("kernels/"))


def test_truncated_files(tiny_artifact, tmp_path):
    path = tiny_artifact[0]
    data = open(path, "rb").read()
    for cut in (len(data) - 10, len(data) // 2, 100, 0):
        p = tmp_path / f"cut{cut}.kiln"
        p.write_bytes(data[:cut])
        with pytest.raises(KilnError, match="truncated|not a Kiln artifact"):
            kiln.load(str(p))


def test_flipped_bytes_fail_their_checksums(tiny_artifact, tmp_path):
    path = tiny_artifact[0]
    with zipfile.ZipFile(path) as z:
        index = json.loads(z.read("manifest.json"))["weights"]["tensors"]
    # inside the weights (past the safetensors header): the tensor is named
    weights = _member_offset(path, "weights.safetensors")
    size = os.path.getsize(path)
    with zipfile.ZipFile(path) as z:
        wsize = z.getinfo("weights.safetensors").file_size
    p = _flip(path, str(tmp_path / "w.kiln"), weights + wsize - 3)
    with pytest.raises(KilnError, match=r"weight '.*' fails its checksum"):
        kiln.load(p)
    assert len(index) > 1
    for member, what in [("plans/0/graph.json", "graph.json' fails its checksum"),
                         (_kernel_member(path), "fails its checksum")]:
        p = _flip(path, str(tmp_path / "m.kiln"), _member_offset(path, member) + 5)
        with pytest.raises(KilnError, match=what):
            kiln.load(p)
    p = _flip(path, str(tmp_path / "man.kiln"), _member_offset(path, "manifest.json") + 20)
    with pytest.raises(KilnError, match="manifest.json"):
        kiln.load(p)
    assert os.path.getsize(path) == size


def test_a_kernel_whose_hash_does_not_match_is_not_loaded(tiny_artifact, tmp_path, monkeypatch):
    from kiln.codegen import tvm_runtime

    path = tiny_artifact[0]
    member = _kernel_member(path)
    with zipfile.ZipFile(path) as z:
        so = z.read(member)
    other = so[:-64] + bytes(64)  # the same size, different bytes
    p = _rewrite(path, str(tmp_path / "k.kiln"), replace={member: other})
    loaded = []
    monkeypatch.setattr(tvm_runtime, "load_module", lambda f: loaded.append(f))
    with pytest.raises(KilnError, match=f"{member}' fails its checksum"):
        kiln.load(p)
    assert not loaded


def test_missing_member_and_unsafe_names(tiny_artifact, tmp_path):
    path = tiny_artifact[0]
    for member in ("weights.safetensors", "plans/0/graph.json", _kernel_member(path)):
        p = _rewrite(path, str(tmp_path / "miss.kiln"), drop={member})
        with pytest.raises(KilnError, match=f"member '{member}' is missing"):
            kiln.load(p)
    p = _rewrite(path, str(tmp_path / "nomanifest.kiln"), drop={"manifest.json"})
    with pytest.raises(KilnError, match="without manifest.json"):
        kiln.load(p)
    for name in ("../x", "/etc/passwd", "a/../../x"):
        p = _rewrite(path, str(tmp_path / "evil.kiln"), extra={name: b"x"})
        with pytest.raises(KilnError, match="unsafe member name"):
            kiln.load(p)


def test_other_format_versions_and_a_manifest_from_the_future(tiny_artifact, tmp_path):
    path = tiny_artifact[0]

    def future(doc):
        doc["format_version"] = FORMAT_VERSION + 1
        doc["kiln_version"] = "9.0"

    p = _rewrite(path, str(tmp_path / "future.kiln"), manifest=future)
    with pytest.raises(KilnError, match=rf"format version {FORMAT_VERSION + 1}.*9\.0.*reads format version "
                                        rf"{FORMAT_VERSION}.*upgrade"):
        kiln.load(p)
    p = _rewrite(path, str(tmp_path / "old.kiln"), manifest=lambda d: d.update(format_version=0))
    with pytest.raises(KilnError, match=rf"format version 0.*reads format version {FORMAT_VERSION}"):
        kiln.load(p)
    p = _rewrite(path, str(tmp_path / "other.kiln"), manifest=lambda d: d.update(format="something-else"))
    with pytest.raises(KilnError, match="not a Kiln artifact"):
        kiln.load(p)
    p = _rewrite(path, str(tmp_path / "partial.kiln"), manifest=lambda d: d.pop("options"))
    with pytest.raises(KilnError, match="manifest is incomplete"):
        kiln.load(p)


def test_a_cuda_artifact_on_a_cpu_machine(tiny_artifact, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = _rewrite(tiny_artifact[0], str(tmp_path / "cuda.kiln"),
                 manifest=lambda d: d["target"].update(kind="cuda", arch="sm_90", features=[]))
    with pytest.raises(KilnError, match=r"compiled for cuda:sm_90 .* no CUDA device"):
        kiln.load(p)


def _consistent(path: str, dst: str, change):
    """The artifact with its weights rewritten by ``change(tensors)`` and every checksum and
    index entry updated to match: only the graph check can tell."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from kiln.artifact_io import crc32

    with zipfile.ZipFile(path) as z:
        tensors = st_load(z.read("weights.safetensors"))
    change(tensors)
    data = st_save(tensors)

    def fix(doc):
        for name, t in tensors.items():
            doc["weights"]["tensors"][name].update(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                                                   crc32=crc32(t.contiguous().view(-1).view(torch.uint8).numpy()))
        doc["members"]["weights.safetensors"] = {"bytes": len(data)}

    return _rewrite(path, dst, replace={"weights.safetensors": data}, manifest=fix)


def test_weights_of_the_wrong_shape_or_dtype(tiny_artifact, tmp_path):
    path = tiny_artifact[0]

    def shape(ts):
        name = next(n for n, t in ts.items() if t.dim() == 2)
        ts[name] = ts[name][:, :-1].contiguous()

    def dtype(ts):
        name = next(n for n, t in ts.items() if t.dtype == torch.float32)
        ts[name] = ts[name].double()

    for change, what in [(shape, "shape"), (dtype, "dtype")]:
        p = _consistent(path, str(tmp_path / f"{what}.kiln"), change)
        with pytest.raises(KilnError, match=r"graph.json does not describe a valid graph.*constant"):
            kiln.load(p)


def test_random_damage_is_a_kiln_error_or_harmless(tiny_artifact, tmp_path):
    """Single-bit flips anywhere in the file (and everywhere in its last bytes, the zip's
    directory): the load raises KilnError, or the bit was one nothing reads (a timestamp)
    and the outputs are unchanged."""
    import random

    path, inputs, out, _ = tiny_artifact
    data = open(path, "rb").read()
    rng = random.Random(0)
    positions = rng.sample(range(len(data) - 100), 60) + list(range(len(data) - 100, len(data), 2))
    damaged = 0
    for pos in positions:
        d = bytearray(data)
        d[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / "flip.kiln"
        p.write_bytes(bytes(d))
        try:
            loaded = kiln.load(str(p))
        except KilnError:
            damaged += 1
            continue
        assert _bitwise(loaded(*inputs), out), f"a flipped bit at {pos} changed the outputs"
    assert damaged > len(positions) // 2


def test_damaged_manifest_fields_are_kiln_errors(tiny_artifact, tmp_path):
    """Every field of the manifest replaced by values of the wrong kind: a KilnError naming
    the problem (or nothing reads that field), never another exception."""
    import random

    path, inputs, _, _ = tiny_artifact
    with zipfile.ZipFile(path) as z:
        doc = json.loads(z.read("manifest.json"))
    fields = []

    def walk(node, where):
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, list):
            items = enumerate(node)
        else:
            items = ()
        for k, v in items:
            fields.append(where + [k])
            walk(v, where + [k])

    walk(doc, [])
    rng = random.Random(0)
    _load_each_damaged(path, str(tmp_path / "m.kiln"), rng.sample(fields, 40), inputs)


def _load_each_damaged(path: str, dst: str, fields: list, inputs) -> None:
    """Load (and call) ``path`` with each manifest field in ``fields`` (a key path) replaced by
    values of the wrong kind: a KilnError, or a model that runs; never another exception."""
    for where in fields:
        for value in (None, "x", -1, [], {}):
            def damage(d, where=where, value=value):
                node = d
                for k in where[:-1]:
                    node = node[k]
                node[where[-1]] = value

            p = _rewrite(path, dst, manifest=damage)
            try:
                loaded = kiln.load(p)
                with torch.no_grad():
                    loaded(*inputs)
            except KilnError:
                pass


def test_paths_that_are_not_artifacts(tmp_path):
    with pytest.raises(KilnError, match="no such file"):
        kiln.load(str(tmp_path / "absent.kiln"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "saved_model.pb").write_bytes(b"\x08\x01")
    with pytest.raises(KilnError, match="is a directory, not a Kiln artifact"):
        kiln.load(str(tmp_path / "folder"))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x04kiln")
    with pytest.raises(KilnError, match="not a Kiln artifact"):
        kiln.load(str(tmp_path / "model.onnx"))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(KilnError, match="not a Kiln artifact"):
        kiln.load(str(tmp_path / "other.zip"))


def test_a_damaged_dynamic_record_is_a_kiln_error(tmp_path, capsys):
    from kiln.cli import main

    m = nn.Sequential(nn.Linear(4, 8), nn.Tanh()).eval()
    fast = kiln.compile(m, (torch.randn(3, 4),), dynamic={0: {0: ("batch", 1, 16)}})
    path = str(tmp_path / "dyn.kiln")
    kiln.save(fast, path)
    assert main(["info", path]) == 0
    assert "varying dims: input dim 0 = batch in [1, 16]" in capsys.readouterr().out
    with zipfile.ZipFile(path) as z:
        rec = json.loads(z.read("manifest.json"))["inputs"]["dynamic"]
    assert rec["dims"][0]["name"] == "batch" and rec["dims"][0]["max"] == 16
    fields = [["hints"], ["dims"], ["hints", "batch"]] + [["dims", 0, k] for k in rec["dims"][0]]
    _load_each_damaged(path, str(tmp_path / "m.kiln"), [["inputs", "dynamic"] + f for f in fields],
                       (torch.randn(5, 4),))
