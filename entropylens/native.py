"""The native chunk kernel: one fused read of each logit row per chunk, built from a few lines of C at first use.

Per row of a finished (R, C) fp32 logit chunk it does, in one call and with no (R, C) temporary:
row max and first argmax (top-1), then Σ e^u and Σ u·e^u with u = z − m' centred on the new running max
m' = max(m, chunk max), merged into the row's fp64 (m, s, t) accumulators exactly as `OnlineLSE._merge`.
A row of a chunk (8 KiB at C = 2048) stays in L1 between the max and the sums, so the chunk is read from
L2/L3 once. e^u uses a Cody–Waite range reduction and a degree-7 polynomial (max relative error ~2e-7 on
u ≤ 0), written so the compiler vectorises it for the ISA torch dispatches to (AVX-512, AVX2 or plain);
sums run in fp32 over 256-logit blocks and in fp64 across blocks.

Why C and not inductor: inductor's fused kernel needs a full torch.compile (15 s cold) and its fp64 sums
and generic reductions cost ~1 ns per logit and thread here; this kernel builds with the system C compiler
in under a second (cached per user, ISA and source hash) and runs at ~0.2–0.3 ns. It is plain C with no
torch headers, called through ctypes (which releases the GIL) from a small thread pool, one row range per
torch thread. No compiler: `available()` is False and the caller must say which path it took instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from entropylens.errors import UserError

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* GCC/Clang vector extensions: 16 lanes, lowered to zmm, 2 x ymm or 4 x xmm by the -m flags. */
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
#define L 16

static inline vf load(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
static inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < L; i++) m = v[i] > m ? v[i] : m; return m; }
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < L; i++) s += v[i]; return s; }

/* e^x: Cody-Waite reduction by ln 2, Cephes' degree-7 polynomial; exactly 0 below -87 (masked ids ~ -1e30). */
static inline vf vexp(vf x) {
    vf zero = {0}, lo = zero - 87.0f;
    vi under = x < lo;
    vf xc = sel(under, lo, x);
    vf k = xc * 1.44269504088896341f + 12582912.0f;  /* round to nearest: 1.5 * 2^23 trick */
    vi ki = (vi)k - 0x4B400000;
    vf kf = __builtin_convertvector(ki, vf);
    vf r = xc - kf * 0.693145751953125f;
    r = r - kf * 1.428606765330187e-06f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    vi bits = (ki + 127) << 23;
    return sel(under, zero, p * (vf)bits);
}

static inline float sexp(float x) { vf v = {0}; v[0] = x; return vexp(v)[0]; }

/* Rows [r0, r1) of z (row stride ld): fold one chunk of ids [offset, offset + C) into the accumulators. */
void chunk_update(const float *z, int64_t ld, int64_t r0, int64_t r1, int64_t C, int64_t offset,
                  double *m, double *s, double *t, double *best, int64_t *top1, double *cmax) {
    int64_t Cv = C - C % L;
    for (int64_t r = r0; r < r1; r++) {
        const float *zr = z + r * ld;
        float mx = -INFINITY;
        if (Cv) {
            vf vm = load(zr);
            for (int64_t j = L; j < Cv; j += L) { vf v = load(zr + j); vm = sel(v > vm, v, vm); }
            mx = hmax(vm);
        }
        for (int64_t j = Cv; j < C; j++) mx = zr[j] > mx ? zr[j] : mx;
        cmax[r] = mx;
        if (mx > best[r]) {  /* first index of the max: only in rows whose best moved (~ln(V/C) chunks) */
            int64_t j = 0;
            while (zr[j] != mx) j++;
            best[r] = mx;
            top1[r] = offset + j;
        }
        double mo = m[r], mn = mo > (double)mx ? mo : (double)mx;
        float c = (float)mn;  /* exact: mn is one of the chunks' fp32 maxima */
        double S = 0.0, T = 0.0;
        for (int64_t b = 0; b < Cv; b += 256) {  /* fp32 lanes within 256 logits, fp64 across */
            int64_t e = b + 256 < Cv ? b + 256 : Cv;
            vf vs = {0}, vt = {0};
            for (int64_t j = b; j < e; j += L) {
                vf u = load(zr + j) - c;
                vf ex = vexp(u);
                vs += ex;
                vt += u * ex;
            }
            S += hsum(vs); T += hsum(vt);
        }
        for (int64_t j = Cv; j < C; j++) { float u = zr[j] - c, ex = sexp(u); S += ex; T += u * ex; }
        if (isinf(mo)) { s[r] = S; t[r] = T; }
        else {
            double a = exp(mo - mn);
            t[r] = a * (t[r] + (mo - mn) * s[r]) + T;
            s[r] = a * s[r] + S;
        }
        m[r] = mn;
    }
}
"""

_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx2",
                     "-mprefer-vector-width=512"],
          "AVX2": ["-mavx2", "-mfma"]}


def isa() -> str:
    """The vector ISA torch dispatches to here (honours ATEN_CPU_CAPABILITY): AVX512, AVX2 or DEFAULT."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _FLAGS else "DEFAULT"


def compiler() -> str | None:
    """The C compiler the kernel would be built with ($CC, else cc/gcc/clang on PATH), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def available() -> bool:
    return compiler() is not None


def _cache_dir() -> Path:
    base = os.environ.get("ENTROPYLENS_KERNEL_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "entropylens", "kernels")
    return Path(base)


_lib: ctypes.CDLL | None = None
_pool: ThreadPoolExecutor | None = None


def _build() -> ctypes.CDLL:
    """Compile SOURCE once per (source, ISA, compiler) into the per-user cache and load it."""
    cc = compiler()
    if cc is None:
        raise UserError("kernel='native' needs a C compiler (cc, gcc or clang on PATH, or $CC); "
                        "use kernel='eager'")
    flags = ["-O3", "-fPIC", "-shared", "-fno-math-errno", *_FLAGS.get(isa(), [])]
    key = hashlib.sha256("\0".join([SOURCE, cc, *flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"chunk_{isa().lower()}_{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src, so = Path(tmp) / "k.c", Path(tmp) / "k.so"
            src.write_text(SOURCE)
            r = subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], capture_output=True, text=True)
            if r.returncode:
                first = (r.stderr.strip().splitlines() or ["?"])[0][:200]
                raise UserError(f"kernel='native': {cc} failed ({first}); use kernel='eager'")
            os.replace(so, out)  # atomic: concurrent builders never load a half-written file
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.chunk_update.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, p, p]
    lib.chunk_update.restype = None
    return lib


def load() -> ctypes.CDLL:
    """The built kernel (built on first call in the process)."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib


def chunk_update(z: torch.Tensor, offset: int, m, s, t, best, top1, cmax) -> None:
    """Fold chunk z (R, C) fp32 (unit column stride) of ids [offset, offset + C) into the row accumulators.

    m, s, t, best, cmax: (R,) fp64 contiguous CPU tensors (cmax is written: the chunk's row maxima);
    top1: (R,) int64. Rows are split over torch.get_num_threads() threads.
    """
    global _pool
    lib = load()
    R, C = z.shape
    assert z.dtype == torch.float32 and z.stride(1) == 1 and z.device.type == "cpu"
    ptrs = [z.data_ptr(), z.stride(0)]
    accs = [a.data_ptr() for a in (m, s, t, best, top1, cmax)]
    n = max(1, min(torch.get_num_threads(), R // 16))
    if n == 1:
        lib.chunk_update(*ptrs, 0, R, C, offset, *accs)
        return
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(n, thread_name_prefix="entropylens-kernel")
    step = -(-R // n)
    futs = [_pool.submit(lib.chunk_update, *ptrs, r0, min(R, r0 + step), C, offset, *accs)
            for r0 in range(0, R, step)]
    for f in futs:
        f.result()
