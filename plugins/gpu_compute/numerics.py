"""The numerics of every compute check, written once against the array API NumPy and CuPy share.

Each function takes ``xp`` (the ``numpy`` or ``cupy`` module) and a ``sync``
callable (a device synchronise; a no-op on NumPy), so CI runs the very same
checksum, memtest patterns and bandwidth arithmetic on the CPU that a GPU
node runs through CuPy. Nothing here imports CuPy, starts a CUDA context or
judges a result: :mod:`vetd.plugins.gpu_compute.worker` runs these in a
short-lived process and :mod:`vetd.plugins.gpu_compute.judge` turns their
numbers into outcomes.

Fault injection (``corrupt=``) is how the tests, and an operator doubting a
GPU's verdict, prove a detector is not vacuous: it changes the product or the
memtest buffer between the write and the verify.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

#: xp: the numpy or cupy module; an array of it.
Array = Any
Sync = Callable[[], None]
Corrupt = Callable[[Array, str], None]

#: GEMM dtypes by the names used in metrics (``tflops_fp64``…). FP32 runs with
#: TF32 off (the worker sets ``CUPY_TF32=0``); FP16 runs on tensor cores with
#: FP32 accumulation (cuBLAS' default compute type for half inputs).
GEMM_DTYPES = ("fp64", "fp32", "fp16")
_XP_DTYPE = {"fp64": "float64", "fp32": "float32", "fp16": "float16"}

#: Machine epsilon of each dtype's output, and of the precision it accumulates in
#: (FP16 on tensor cores accumulates in FP32).
EPS = {"fp64": 2.0**-52, "fp32": 2.0**-23, "fp16": 2.0**-10}
EPS_ACCUMULATE = {"fp64": 2.0**-52, "fp32": 2.0**-23, "fp16": 2.0**-23}
#: How many times the expected rounding noise the checksum statistic may reach.
TOLERANCE_MARGIN = {"fp64": 16.0, "fp32": 16.0, "fp16": 8.0}


def gemm_tolerance(dtype: str, k: int) -> float:
    """The checksum tolerance for a product of inner dimension ``k`` (statistic of :func:`gemm_checksum`).

    Two kinds of rounding move a column sum of the product: rounding each
    output element to its dtype (``m`` independent errors of ``eps/2``: the
    statistic grows as ``eps/k`` for inputs uniform in [-1, 1]) and rounding
    while accumulating ``k`` terms (``eps_acc/sqrt(k)``). Measured on NumPy
    (k = 256…2048): FP16 ≈ 1.0·eps/k, FP32 ≈ 0.5·eps/sqrt(k), FP64 ≈
    0.3·eps/sqrt(k) (the FP64 reference's own rounding included). The tolerance
    is ``margin × (eps/k + eps_acc/sqrt(k))``; one element with a flipped sign
    moves its column by about ``2.7/k**1.5`` (1e-5 at k = 4096, above every
    tolerance), a flipped exponent bit by orders of magnitude more. Flips of an
    FP16/FP32 element's low mantissa bits are below that dtype's own rounding and
    no checksum can tell them from it; a faulty SM or memory path corrupts a
    whole tile, far above it.
    """
    return TOLERANCE_MARGIN[dtype] * (EPS[dtype] / k + EPS_ACCUMULATE[dtype] / math.sqrt(k))


def xp_dtype(xp: Any, name: str) -> Any:
    return getattr(xp, _XP_DTYPE[name])


def uniform(xp: Any, shape: tuple[int, ...], seed: int, dtype: Any) -> Array:
    """Values in [-1, 1) from a counter hash: the same numbers on NumPy and CuPy (their RNGs differ)."""
    count = math.prod(shape)
    bits = hash32(xp, xp.arange(count, dtype=xp.uint64), seed)
    values = bits.astype(xp.float64) * (2.0 / 2**32) - 1.0
    return values.reshape(shape).astype(dtype)


def hash32(xp: Any, index: Array, seed: int) -> Array:
    """A 32-bit mix of ``index`` and ``seed`` (lowbias32 after a Weyl step); wraps, never warns."""
    offset = xp.uint64((seed * 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)  # each seed its own stretch of the sequence
    h = ((index + offset) * xp.uint64(0x9E3779B97F4A7C15)) >> xp.uint64(32)
    h = h.astype(xp.uint32)
    h ^= h >> xp.uint32(16)
    h *= xp.uint32(0x7FEB352D)
    h ^= h >> xp.uint32(15)
    h *= xp.uint32(0x846CA68B)
    h ^= h >> xp.uint32(16)
    return h


def matmul(xp: Any, a: Array, b: Array) -> Array:
    """``a @ b`` in the inputs' dtype. NumPy has no FP16 BLAS and would accumulate
    in half precision; like a tensor core, accumulate in FP32 and round once."""
    if xp.__name__ == "numpy" and a.dtype == xp.float16:
        return (a.astype(xp.float32) @ b.astype(xp.float32)).astype(xp.float16)
    return a @ b


def gemm_checksum(xp: Any, a: Array, b: Array, c: Array) -> float:
    """How far ``c`` is from ``a @ b``: the column-sum identity ``1ᵀ(AB) = (1ᵀA)B``.

    Computed in FP64 from the same inputs: ``got = 1ᵀC``, ``want = (1ᵀA)B``;
    each column's error is divided by ``(1ᵀ|A|)|B|``, the column's magnitude
    taken from the inputs (a corrupt ``c`` cannot inflate it and hide itself).
    Returns the largest such ratio; ``inf`` when ``c`` holds a NaN or infinity.
    O(n²) work against the GEMM's O(n³).
    """
    a64, b64 = a.astype(xp.float64), b.astype(xp.float64)
    got = c.astype(xp.float64).sum(axis=0)
    want = a64.sum(axis=0) @ b64
    scale = xp.abs(a64).sum(axis=0) @ xp.abs(b64)
    ratio = xp.abs(got - want) / scale
    if not bool(xp.all(xp.isfinite(ratio))):
        return math.inf
    return float(ratio.max())


def gemm(xp: Any, sync: Sync, dtype: str, n: int, repeats: int, seed: int = 1,
         corrupt: Corrupt | None = None) -> dict[str, float]:
    """Square ``n``×``n`` GEMMs in ``dtype``: TFLOP/s (best of ``repeats``, 2n³ flops each) and the checksum."""
    kind = xp_dtype(xp, dtype)
    a = uniform(xp, (n, n), seed, kind)
    b = uniform(xp, (n, n), seed + 1, kind)
    c = matmul(xp, a, b)  # warm-up: cuBLAS picks its kernel, clocks ramp
    sync()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        c = matmul(xp, a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    if corrupt is not None:
        corrupt(c, "gemm")
    error = gemm_checksum(xp, a, b, c)
    return {"tflops": 2.0 * n**3 / best / 1e12, "checksum_error": error,
            "tolerance": gemm_tolerance(dtype, n), "n": float(n), "seconds": best}


# -- memtest ----------------------------------------------------------------

#: Words verified per chunk: bounds the scratch memory of the expected pattern.
CHUNK_WORDS = 1 << 24


def _walking(xp: Any, index: Array, step: int, _seed: int) -> Array:
    return xp.uint32(1) << ((index + xp.uint64(step)) % xp.uint64(32)).astype(xp.uint32)


def _address(xp: Any, index: Array, step: int, _seed: int) -> Array:
    words = index.astype(xp.uint32)  # low 32 bits of the word's index
    return words if step % 2 == 0 else ~words  # then its complement: every bit both ways


def _random(xp: Any, index: Array, step: int, seed: int) -> Array:
    return hash32(xp, index, seed * 1009 + step)


#: Pattern name → the word each index holds in pass ``step``.
PATTERNS: dict[str, Callable[[Any, Array, int, int], Array]] = {
    "walking_ones": _walking, "address": _address, "random": _random}


def memtest(xp: Any, sync: Sync, words: int, passes: int = 2, seed: int = 1,
            corrupt: Corrupt | None = None) -> dict[str, float]:
    """Write each pattern over ``words`` 32-bit words, read it back, count the words that differ.

    ``passes`` of each pattern (walking ones shifts by one bit per pass, the
    address pattern alternates with its complement, random reseeds).
    """
    buffer = xp.empty(words, dtype=xp.uint32)
    bad = 0
    start = time.perf_counter()
    for name, pattern in PATTERNS.items():
        for step in range(max(1, passes)):
            for lo in range(0, words, CHUNK_WORDS):
                hi = min(words, lo + CHUNK_WORDS)
                buffer[lo:hi] = pattern(xp, xp.arange(lo, hi, dtype=xp.uint64), step, seed)
            sync()
            if corrupt is not None:
                corrupt(buffer, name)
            for lo in range(0, words, CHUNK_WORDS):
                hi = min(words, lo + CHUNK_WORDS)
                expected = pattern(xp, xp.arange(lo, hi, dtype=xp.uint64), step, seed)
                bad += int(xp.count_nonzero(buffer[lo:hi] != expected))
    sync()
    return {"bad_words": float(bad), "tested_bytes": float(words * 4), "passes": float(passes),
            "seconds": time.perf_counter() - start}


# -- bandwidth --------------------------------------------------------------

def best_seconds(sync: Sync, work: Callable[[], object], repeats: int) -> float:
    """Run ``work`` once to warm up, then ``repeats`` times; the fastest run (as STREAM reports)."""
    work()
    sync()
    best = math.inf
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        work()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def gbps(nbytes: float, seconds: float) -> float:
    """Decimal GB/s (1e9 bytes), as STREAM and nccl-tests count."""
    return nbytes / seconds / 1e9 if seconds > 0 else math.inf


def stream(xp: Any, sync: Sync, nbytes: int, repeats: int,
           triad: Callable[[Array, Array, Array, float], object] | None = None) -> dict[str, float]:
    """Device copy (``b = a``: 2 arrays of bytes moved) and triad (``a = b + s·c``: 3 arrays), STREAM's way.

    ``nbytes`` per array, FP64 elements. Bytes counted are what STREAM counts
    (each array read or written once), whatever the library moves in fact: on
    NumPy the triad needs two passes, on CuPy it is one fused kernel (``triad``).
    """
    n = max(1, nbytes // 8)
    a = xp.zeros(n, dtype=xp.float64)
    b = xp.ones(n, dtype=xp.float64)
    c = xp.full(n, 2.0, dtype=xp.float64)
    scalar = 3.0

    def fallback(out: Array, x: Array, y: Array, s: float) -> None:
        xp.multiply(y, s, out=out)
        xp.add(out, x, out=out)

    fused = triad or fallback
    copy_s = best_seconds(sync, lambda: xp.copyto(b, a), repeats)
    b[...] = 1.0
    triad_s = best_seconds(sync, lambda: fused(a, b, c, scalar), repeats)
    ok = bool(xp.all(a == 1.0 + scalar * 2.0))
    size = n * 8
    return {"copy_gbps": gbps(2 * size, copy_s), "triad_gbps": gbps(3 * size, triad_s),
            "array_bytes": float(size), "triad_ok": float(ok)}


def host_device(xp: Any, sync: Sync, nbytes: int, repeats: int, host: Array,
                to_device: Callable[[Array, Array], object], to_host: Callable[[Array, Array], object]
                ) -> dict[str, float]:
    """Host→device and device→host copies of ``nbytes`` from/to ``host`` (pinned on CuPy), GB/s each way."""
    n = host.size
    device = xp.empty(n, dtype=host.dtype)
    h2d = best_seconds(sync, lambda: to_device(device, host), repeats)
    d2h = best_seconds(sync, lambda: to_host(device, host), repeats)
    return {"h2d_gbps": gbps(nbytes, h2d), "d2h_gbps": gbps(nbytes, d2h), "copy_bytes": float(nbytes)}


# -- collectives ------------------------------------------------------------

def busbw_factor(ranks: int) -> float:
    """nccl-tests' all-reduce bus bandwidth factor: busbw = algbw × 2(n−1)/n (0 for one rank, as nccl-tests)."""
    return 2.0 * (ranks - 1) / ranks


def size_sweep(smallest: int, largest: int) -> list[int]:
    """Message sizes in bytes, doubling from ``smallest`` to ``largest`` (both included)."""
    sizes, size = [], max(1, smallest)
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return sizes
