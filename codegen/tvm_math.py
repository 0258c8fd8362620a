"""float32 exp, tanh, erf and sigmoid for generated kernels, built from arithmetic that vectorizes.

TVM lowers ``tirx.exp`` / ``tanh`` / ``erf`` / ``sigmoid`` to LLVM math intrinsics, which the x86
backend turns into one libm call per vector lane: generated kernels holding them ran several
times slower than torch's vectorized functions, so their groups lost kernel choice and ran
node by node. The forms below are polynomials, selects and exponent-bit arithmetic, which
LLVM keeps in AVX-512 registers:

- exp: Cephes' ``expf`` (range reduction by ln 2, degree-6 polynomial), the power of two
  built in the exponent bits in two halves so that every intermediate stays a normal
  number; underflow is flushed to 0 (below exp(-87.3), where torch would give a denormal
  under 1.2e-38), overflow gives inf.
- tanh, erf: the rational approximations of Eigen's ``generic_fast_tanh_float`` and
  ``generic_fast_erf_float`` (TVM's ``fast_tanh`` / ``fast_erf`` use the same coefficients).
- sigmoid: 1 / (1 + exp(-x)).

Each form binds its operand once with a TIR ``Let``. TVM's vectorizer rejects a ``Let``
in a loop that stores bf16/fp16 (its lowering of the narrowing cast reads the stored
expression several times, so the vectorizer meets the ``Let`` twice: "Let cannot bind the
same var to two different values"), so groups with 16-bit floats take the forms with the
operand written out at each use (``bind=False``; LLVM merges the copies), one form deep
(``codegen.tvm`` decides). NaN propagates through the clamps. Errors are a few float32 ulp
(tests compare them with torch over the whole input range, ``tests/codegen/test_tvm_math.py``).
"""
from __future__ import annotations

_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)
# exp(-87.33654) is the smallest normal float: below it the result is flushed to 0 (computing
# a denormal would cost microcode assists); exp(88.8) overflows to inf, as it should
_EXP_LO, _EXP_HI = -87.33654, 88.8

_TANH_CLAMP = 7.90531110763549805
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)

_ERF_CLAMP = 4.0
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _c(value):
    from tvm import tirx

    return tirx.const(value, "float32")


def _horner(x, coeffs):
    acc = _c(coeffs[0])
    for k in coeffs[1:]:
        acc = acc * x + _c(k)
    return acc


def _clamp(x, lo, hi):
    """x within [lo, hi]; NaN stays NaN (both comparisons are false), so NaN propagates."""
    from tvm import tirx

    return tirx.Select(x < _c(lo), _c(lo), tirx.Select(x > _c(hi), _c(hi), x))


def _let(v, body):
    """``body(x)`` with ``x`` bound to ``v`` once: ``v`` may be a long fused expression, and the
    forms read their operand several times (unbound, nested forms grew exponentially). The
    temporaries inside a form stay unbound: with more Lets, LLVM's code generation time grew
    superlinearly with the nesting of the forms."""
    from tvm import tirx

    x = tirx.Var("x", str(v.ty))
    return tirx.Let(x, v, body(x))


def _pow2(n):
    """2 ** n for an int32 ``n`` in [-126, 127], built in the exponent bits."""
    from tvm import tirx

    return tirx.reinterpret("float32", (n + tirx.const(127, "int32")) << tirx.const(23, "int32"))


def _exp(x):
    from tvm import tirx

    r0 = _clamp(x, _EXP_LO, _EXP_HI)
    nf = tirx.floor(r0 * _c(_LOG2E) + _c(0.5))  # in [-126, 128]
    r = r0 - nf * _c(_LN2_HI) - nf * _c(_LN2_LO)
    p = _horner(r, _EXP_POLY) * r * r + r + _c(1.0)
    # 2**nf as two factors, each a normal float. A NaN x makes p NaN already; nf is zeroed so
    # the float -> int conversion never sees NaN (LLVM makes that poison, not a fixed value)
    ni = tirx.Select(nf == nf, nf, _c(0.0))
    half = tirx.floor(ni * _c(0.5))
    y = p * _pow2(tirx.Cast("int32", half)) * _pow2(tirx.Cast("int32", ni - half))
    return tirx.Select(x < _c(_EXP_LO), _c(0.0), y)


def _rational(x, clamp, p, q):
    """c * p(c^2) / q(c^2) for c = x clamped to [-clamp, clamp]."""
    c = _clamp(x, -clamp, clamp)
    c2 = c * c
    return c * _horner(c2, p) / _horner(c2, q)


def _tanh(x):
    from tvm import tirx

    # past +-9 tanh is within an ulp of +-1 in float32 (exactly +-1 from about 9.1); the
    # rational stops a few ulp short of it at its clamp
    y = _rational(x, _TANH_CLAMP, _TANH_P, _TANH_Q)
    return tirx.Select(x > _c(9.0), _c(1.0), tirx.Select(x < _c(-9.0), _c(-1.0), y))


def _erf(x):
    return _rational(x, _ERF_CLAMP, _ERF_P, _ERF_Q)


def exp(v, bind: bool = True):
    return _let(v, _exp) if bind else _exp(v)


def tanh(v, bind: bool = True):
    return _let(v, _tanh) if bind else _tanh(v)


def erf(v, bind: bool = True):
    return _let(v, _erf) if bind else _erf(v)


def sigmoid(v, bind: bool = True):
    return _c(1.0) / (_c(1.0) + exp(-v, bind))


# tirx function name -> vectorizable float32 form
FLOAT32 = {"exp": exp, "tanh": tanh, "erf": erf, "sigmoid": sigmoid}
