"""kiln._C: fused RNN cells against torch, and argument checking."""

import numpy as np
import pytest
import torch

from kiln import _C


@pytest.mark.parametrize("batch,hidden", [(1, 1), (3, 17), (32, 128)])
def test_lstm_cell_matches_torch(batch, hidden):
    gx, gh = torch.randn(batch, 4 * hidden) * 2, torch.randn(batch, 4 * hidden) * 2
    gates = gx + gh
    c = torch.randn(batch, hidden)
    h_out, c_out = torch.empty(batch, hidden), torch.empty(batch, hidden)
    _C.lstm_cell(gx.numpy(), gh.numpy(), c.numpy(), h_out.numpy(), c_out.numpy())
    i, f, g, o = gates.chunk(4, 1)
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(c_out, c_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_out, torch.sigmoid(o) * torch.tanh(c_ref), atol=1e-6, rtol=1e-5)


def test_lstm_cell_special_values():
    gates = torch.tensor([[float("nan"), 100.0, -100.0, 0.0, 1e30, -1e30, 50.0, -50.0]])
    c = torch.tensor([[1.0, 2.0]])
    h, c2 = torch.empty(1, 2), torch.empty(1, 2)
    _C.lstm_cell(gates.numpy(), torch.zeros_like(gates).numpy(), c.numpy(), h.numpy(), c2.numpy())
    i, f, g, o = gates.chunk(4, 1)
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    torch.testing.assert_close(c2, c_ref, equal_nan=True)


@pytest.mark.parametrize("batch,hidden", [(1, 3), (5, 33), (32, 128)])
def test_gru_cell_matches_torch(batch, hidden):
    gx, gh = torch.randn(batch, 3 * hidden) * 3, torch.randn(batch, 3 * hidden) * 3
    b_hh = torch.randn(3 * hidden)
    h = torch.randn(batch, hidden)
    out = torch.empty(batch, hidden)
    _C.gru_cell(gx.numpy(), gh.numpy(), b_hh.numpy(), h.numpy(), out.numpy())
    xr, xz, xn = gx.chunk(3, 1)
    hr, hz, hn = (gh + b_hh).chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    torch.testing.assert_close(out, (1 - z) * n + z * h, atol=1e-6, rtol=1e-5)


def test_cells_reject_bad_arguments():
    g = np.zeros((2, 8), np.float32)
    c = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="c: expected shape"):
        _C.lstm_cell(g, g, np.zeros((3, 2), np.float32), c.copy(), c.copy())
    with pytest.raises(ValueError, match="gx"):
        _C.lstm_cell(np.zeros((2, 7), np.float32), g, c, c.copy(), c.copy())
    with pytest.raises(ValueError, match="gh"):
        _C.lstm_cell(g, np.zeros((2, 4), np.float32), c, c.copy(), c.copy())
    with pytest.raises(TypeError):  # wrong dtype is rejected, never silently copied
        _C.lstm_cell(g.astype(np.float64), g, c, c.copy(), c.copy())
    with pytest.raises(TypeError):  # non-contiguous output
        _C.lstm_cell(g, g, c, np.zeros((2, 4), np.float32)[:, ::2], c.copy())
    ro = c.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        _C.lstm_cell(g, g, c, ro, c.copy())
    g3 = np.zeros((2, 6), np.float32)
    with pytest.raises(ValueError, match="gh"):
        _C.gru_cell(g3, np.zeros((2, 5), np.float32), np.zeros(6, np.float32), c, c.copy())
    with pytest.raises(ValueError, match="b_hh"):
        _C.gru_cell(g3, g3, np.zeros(5, np.float32), c, c.copy())


def _lstm_steps(gx, w, h, c):
    ys = []
    for t in range(gx.shape[0]):
        i, f, g, o = (gx[t] + h @ w.T).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys), h, c


def _gru_steps(gx, w, b_hh, h):
    ys = []
    for t in range(gx.shape[0]):
        xr, xz, xn = gx[t].chunk(3, 1)
        hr, hz, hn = (h @ w.T + b_hh).chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys), h


needs_simd = pytest.mark.skipif(not _C.recurrence_supported(), reason="fused recurrences need AVX-512 or AVX2 + FMA")


@needs_simd
# (7, 8 and 14 rows: full tiles and a 1-2-row remainder with AVX2; 13 on two threads: one
# thread's rows, the hidden blocks split)
@pytest.mark.parametrize("T,B,H,threads", [(5, 1, 16, 1), (7, 3, 20, 1), (4, 7, 24, 1), (4, 8, 40, 1),
                                           (3, 14, 16, 1), (6, 13, 33, 2), (4, 32, 128, 2)])
def test_fused_recurrences_match_step_by_step_torch(T, B, H, threads):
    gx4, w4 = torch.randn(T, B, 4 * H), torch.randn(4 * H, H) * 0.3
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    y, hn, cn = torch.empty(T, B, H), torch.empty(B, H), torch.empty(B, H)
    _C.lstm_recurrence(gx4.numpy(), _C.pack_recurrent_weight(w4.numpy(), 4), h0.numpy(), c0.numpy(), y.numpy(),
                       hn.numpy(), cn.numpy(), threads)
    ry, rh, rc = _lstm_steps(gx4, w4, h0, c0)
    for got, want in ((y, ry), (hn, rh), (cn, rc)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    gx3, w3, b_hh = torch.randn(T, B, 3 * H), torch.randn(3 * H, H) * 0.3, torch.randn(3 * H)
    y, hn = torch.empty(T, B, H), torch.empty(B, H)
    _C.gru_recurrence(gx3.numpy(), _C.pack_recurrent_weight(w3.numpy(), 3), b_hh.numpy(), h0.numpy(), y.numpy(),
                      hn.numpy(), threads)
    ry, rh = _gru_steps(gx3, w3, b_hh, h0)
    torch.testing.assert_close(y, ry, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(hn, rh, atol=2e-5, rtol=1e-4)


@needs_simd
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_recurrences_take_batch_first_strided_views(threads):
    # batch-first tensors seen as [T, B, .]: nothing is copied, results are the same
    T, B, H = 6, 5, 24
    gx4, w4 = torch.randn(B, T, 4 * H), torch.randn(4 * H, H) * 0.3
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    y, hn, cn = torch.empty(B, T, H), torch.empty(B, H), torch.empty(B, H)
    _C.lstm_recurrence(gx4.transpose(0, 1).numpy(), _C.pack_recurrent_weight(w4.numpy(), 4), h0.numpy(), c0.numpy(),
                       y.transpose(0, 1).numpy(), hn.numpy(), cn.numpy(), threads)
    ry, rh, rc = _lstm_steps(gx4.transpose(0, 1), w4, h0, c0)
    torch.testing.assert_close(y, ry.transpose(0, 1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(hn, rh, atol=2e-5, rtol=1e-4)
    gx3, w3, b_hh = torch.randn(B, T, 3 * H), torch.randn(3 * H, H) * 0.3, torch.randn(3 * H)
    y = torch.empty(B, T, H)
    _C.gru_recurrence(gx3.transpose(0, 1).numpy(), _C.pack_recurrent_weight(w3.numpy(), 3), b_hh.numpy(), h0.numpy(),
                      y.transpose(0, 1).numpy(), hn.numpy(), threads)
    ry, rh = _gru_steps(gx3.transpose(0, 1), w3, b_hh, h0)
    torch.testing.assert_close(y, ry.transpose(0, 1), atol=2e-5, rtol=1e-4)


@needs_simd
def test_fused_recurrence_gates_at_special_values():
    # the gates' own exp (simd_vec.h's scale2: vscalefps, or the exponent built by hand with
    # AVX2) at NaN, the clamps' edges and beyond, and infinities: torch's values, NaN kept
    v = torch.tensor([float("nan"), 100.0, -100.0, 0.0, 1e30, -1e30, 50.0, -50.0, 87.5, -87.5, 43.6, -43.6,
                      float("inf"), float("-inf"), 1e-8, 3.0])
    H = v.numel()
    gx4 = torch.stack([v.roll(i) for i in range(4)]).reshape(1, 1, 4 * H)
    h0, c0 = torch.zeros(1, H), torch.linspace(-2, 2, H).reshape(1, H)
    y, hn, cn = torch.empty(1, 1, H), torch.empty(1, H), torch.empty(1, H)
    _C.lstm_recurrence(gx4.numpy(), _C.pack_recurrent_weight(np.zeros((4 * H, H), np.float32), 4), h0.numpy(),
                       c0.numpy(), y.numpy(), hn.numpy(), cn.numpy(), 1)
    ry, rh, rc = _lstm_steps(gx4, torch.zeros(4 * H, H), h0, c0)
    torch.testing.assert_close(cn, rc, atol=1e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(y, ry, atol=1e-6, rtol=1e-6, equal_nan=True)


@needs_simd
def test_fused_recurrence_rejects_bad_arguments():
    T, B, H = 3, 2, 16
    gx = np.zeros((T, B, 4 * H), np.float32)
    p = _C.pack_recurrent_weight(np.zeros((4 * H, H), np.float32), 4)
    s = np.zeros((B, H), np.float32)
    with pytest.raises(ValueError, match="packed"):
        _C.lstm_recurrence(gx, p[:-1], s, s, np.zeros((T, B, H), np.float32), s.copy(), s.copy())
    with pytest.raises(ValueError, match="y"):
        _C.lstm_recurrence(gx, p, s, s, np.zeros((T, B, H + 1), np.float32), s.copy(), s.copy())
    with pytest.raises(ValueError, match="w_hh"):
        _C.pack_recurrent_weight(np.zeros((5, 4), np.float32), 4)
    with pytest.raises(ValueError, match="contiguous rows"):  # a row with a stride is refused
        _C.lstm_recurrence(np.zeros((T, B, 8 * H), np.float32)[:, :, ::2], p, s, s, np.zeros((T, B, H), np.float32),
                           s.copy(), s.copy())
    with pytest.raises(ValueError, match="writable"):
        y = np.zeros((T, B, H), np.float32)
        y.flags.writeable = False
        _C.lstm_recurrence(gx, p, s, s, y, s.copy(), s.copy())


@needs_simd
def test_fused_layer_rejects_bad_arguments():
    T, B, F, H = 3, 2, 5, 16  # F: input size
    x = np.zeros((T, B, F), np.float32)
    w_ih, w_hh = np.zeros((4 * H, F), np.float32), np.zeros((4 * H, H), np.float32)
    p = _C.pack_layer_weight(w_ih, w_hh, None, None, 4)
    s = np.zeros((B, H), np.float32)
    y = np.zeros((T, B, H), np.float32)
    _C.lstm_layer(x, p, s, s, y, s.copy(), s.copy())
    with pytest.raises(ValueError, match="packed"):
        _C.lstm_layer(x, p[:-1], s, s, y, s.copy(), s.copy())
    with pytest.raises(ValueError, match="packed"):  # packed for another input size
        _C.lstm_layer(np.zeros((T, B, F + 1), np.float32), p, s, s, y, s.copy(), s.copy())
    with pytest.raises(ValueError, match="packed"):  # LSTM panels are not GRU panels
        _C.gru_layer(x, p, s, y, s.copy())
    with pytest.raises(ValueError, match="h0"):
        _C.lstm_layer(x, p, np.zeros((B, H + 1), np.float32), s, y, s.copy(), s.copy())
    with pytest.raises(ValueError, match="w_ih"):
        _C.pack_layer_weight(np.zeros((3 * H, F), np.float32), w_hh, None, None, 4)
    with pytest.raises(ValueError, match="b_ih"):
        _C.pack_layer_weight(w_ih, w_hh, np.zeros(H, np.float32), None, 4)
    with pytest.raises(ValueError, match="gates"):
        _C.pack_layer_weight(w_ih, w_hh, None, None, 2)
    with pytest.raises(ValueError, match="contiguous rows"):
        _C.lstm_layer(np.zeros((T, B, 2 * F), np.float32)[:, :, ::2], p, s, s, y, s.copy(), s.copy())
    with pytest.raises(ValueError, match="writable"):
        ro = s.copy()
        ro.flags.writeable = False
        _C.lstm_layer(x, p, s, s, y, s.copy(), ro)


def _copy_at(a: np.ndarray, offset: int) -> np.ndarray:
    """The same values in an array whose data starts ``offset`` bytes past a 64-byte line."""
    buf = np.empty(a.size + 32, np.float32)
    start = (-buf.ctypes.data // 4) % 16 + offset // 4
    out = buf[start:start + a.size]
    out[:] = a
    assert out.ctypes.data % 64 == offset
    return out


@needs_simd
def test_packings_are_line_aligned_and_a_misaligned_copy_gives_the_same_bits():
    # the kernels read panels as whole vectors: a packing starts on a 64-byte line (numpy's
    # allocations land at any 16-byte offset), and a copy that lost the alignment (np.copy,
    # unpickling) is read through an aligned copy, with exactly the same result
    T, B, F, H = 5, 3, 7, 24
    rng = np.random.default_rng(0)

    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x, gx4, gx3, h0, c0, b_hh = r(T, B, F), r(T, B, 4 * H), r(T, B, 3 * H), r(B, H), r(B, H), r(3 * H)
    packs = {"rec4": _C.pack_recurrent_weight(r(4 * H, H, scale=0.3), 4),
             "rec3": _C.pack_recurrent_weight(r(3 * H, H, scale=0.3), 3),
             "layer4": _C.pack_layer_weight(r(4 * H, F), r(4 * H, H, scale=0.3), r(4 * H), r(4 * H), 4),
             "layer3": _C.pack_layer_weight(r(3 * H, F), r(3 * H, H, scale=0.3), r(3 * H), r(3 * H), 3)}
    assert all(p.ctypes.data % 64 == 0 for p in packs.values())
    assert all(_C.pack_recurrent_weight(r(4 * H, H), 4).ctypes.data % 64 == 0 for _ in range(8))

    def run(p):
        outs = []
        y, hn, cn = np.empty((T, B, H), np.float32), np.empty((B, H), np.float32), np.empty((B, H), np.float32)
        _C.lstm_recurrence(gx4, p["rec4"], h0, c0, y, hn, cn, 1)
        outs += [y.copy(), hn.copy(), cn.copy()]
        _C.gru_recurrence(gx3, p["rec3"], b_hh, h0, y, hn, 1)
        outs += [y.copy(), hn.copy()]
        _C.lstm_layer(x, p["layer4"], h0, c0, y, hn, cn, 1)
        outs += [y.copy(), hn.copy(), cn.copy()]
        _C.gru_layer(x, p["layer3"], h0, y, hn, 1)
        outs += [y.copy(), hn.copy()]
        return outs

    want = run(packs)
    for offset in (4, 16, 32):
        for g, w in zip(run({k: _copy_at(v, offset) for k, v in packs.items()}), want):
            np.testing.assert_array_equal(g, w)
