"""The native chunk kernel: one fused read of each logit row per chunk, built from a few lines of C at first use.

Per row of a finished (R, C) fp32 logit chunk it does, in one call and with no (R, C) temporary:
row max and first argmax (top-1), the running top-K (optional: a chunk whose max does not beat the row's
K-th value is skipped with one compare), then Σ e^u and Σ u·e^u with u = z − m' centred on the new running max
m' = max(m, chunk max), merged into the row's fp64 (m, s, t) accumulators exactly as `OnlineLSE._merge`.
A row of a chunk (8 KiB at C = 2048) stays in L1 between the max and the sums, so the chunk is read from
L2/L3 once. e^u uses a Cody–Waite range reduction and Cephes' degree-7 expf polynomial (about 1 ulp),
written so the compiler vectorises it for the ISA torch dispatches to (AVX-512, AVX2 or plain);
sums run in fp32 over 256-logit blocks and in fp64 across blocks.

Threads: built with -fopenmp, the kernel's row loop runs on the OpenMP team that torch's (MKL) GEMMs use —
the same libgomp.so.1, already loaded by torch, so its threads are still spinning from the GEMM. A
compiler without OpenMP gets a serial build (`threading()` says which). (A Python thread pool over a serial
build, ctypes releasing the GIL, measured 55 % of the floor against OpenMP's 64 % on the loaded 2-core
machine: woken threads queue behind other processes; the OpenMP team is already on the cores.)

Why C and not inductor: inductor's fused kernel needs a full torch.compile (15 s cold) and its fp64 sums
and generic reductions cost ~1 ns per logit and thread here; this kernel builds with the system C compiler
in under a second (cached per user, ISA and source hash) and measured 0.34–0.45 ns per logit with 2
AVX-512 threads (eager's update: ~0.95). It is plain C with no torch headers, called through ctypes. No
compiler: `available()` is False and `decode.resolve_kernel` picks eager and says so.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from entropylens.errors import UserError

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

/* GCC/Clang vector extensions, one register wide: VBYTES = 64 (AVX-512), 32 (AVX2) or 16 (SSE2), set by
   the build (a 64-byte vector split over AVX2 registers measured 6x slower: parts of it went scalar). */
#ifndef VBYTES
#define VBYTES 16
#endif
typedef float vf __attribute__((vector_size(VBYTES)));
typedef int32_t vi __attribute__((vector_size(VBYTES)));
#define L (VBYTES / 4)

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

typedef struct { double *m, *s, *t, *best; int64_t *top1; double *cmax; int64_t K; double *kv; int64_t *ki; } acc_t;

/* Insert logit x of id j into a row's top-K list (values descending, ids ascending among equal values),
   given x > v[K-1]: an equal value already listed came from a lower id and stays ahead. */
static inline void topk_insert(double *v, int64_t *id, int64_t K, double x, int64_t j) {
    int64_t p = K - 1;
    while (p > 0 && v[p - 1] < x) { v[p] = v[p - 1]; id[p] = id[p - 1]; p--; }
    v[p] = x; id[p] = j;
}

/* Fold a row chunk into its running top-K: only 8-vector blocks whose max beats the K-th value are read
   element by element, so after the first chunks nearly every block costs one vector max and a compare. */
static void topk_scan(const float *zr, int64_t C, int64_t offset, double *v, int64_t *id, int64_t K) {
    int64_t B = 8 * L, Cb = C - C % B;
    for (int64_t b = 0; b < Cb; b += B) {
        vf vm = load(zr + b);
        for (int64_t j = b + L; j < b + B; j += L) { vf x = load(zr + j); vm = sel(x > vm, x, vm); }
        if ((double)hmax(vm) <= v[K - 1]) continue;
        for (int64_t j = b; j < b + B; j++)
            if ((double)zr[j] > v[K - 1]) topk_insert(v, id, K, zr[j], offset + j);
    }
    for (int64_t j = Cb; j < C; j++)
        if ((double)zr[j] > v[K - 1]) topk_insert(v, id, K, zr[j], offset + j);
}

static inline float row_max(const float *zr, int64_t C) {
    int64_t Cv = C - C % L;
    float mx = -INFINITY;
    if (Cv) {
        vf vm = load(zr);
        for (int64_t j = L; j < Cv; j += L) { vf v = load(zr + j); vm = sel(v > vm, v, vm); }
        mx = hmax(vm);
    }
    for (int64_t j = Cv; j < C; j++) mx = zr[j] > mx ? zr[j] : mx;
    return mx;
}

/* Row r, whose chunk max is mx: top-1, then the sums centred on the new running max, merged in fp64. */
static inline void row_fold(const float *zr, int64_t C, int64_t offset, int64_t r, float mx, acc_t a) {
    int64_t Cv = C - C % L;
    a.cmax[r] = mx;
    if (mx > a.best[r]) {  /* first index of the max: only in rows whose best moved (~ln(V/C) chunks) */
        int64_t j = 0;
        while (zr[j] != mx) j++;
        a.best[r] = mx;
        a.top1[r] = offset + j;
    }
    if (a.K && (double)mx > a.kv[r * a.K + a.K - 1])  /* the chunk holds a new top-K entry: rare after a few chunks */
        topk_scan(zr, C, offset, a.kv + r * a.K, a.ki + r * a.K, a.K);
    double mo = a.m[r], mn = mo > (double)mx ? mo : (double)mx;
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
    if (isinf(mo)) { a.s[r] = S; a.t[r] = T; }
    else {
        double al = exp(mo - mn);
        a.t[r] = al * (a.t[r] + (mo - mn) * a.s[r]) + T;
        a.s[r] = al * a.s[r] + S;
    }
    a.m[r] = mn;
}

/* Rows [r0, r1) of z (row stride ld): fold one chunk of ids [offset, offset + C) into the accumulators,
   over nt threads of the OpenMP team torch's GEMMs use (built with -fopenmp; serial otherwise). */
void chunk_update(const float *z, int64_t ld, int64_t r0, int64_t r1, int64_t C, int64_t offset,
                  double *m, double *s, double *t, double *best, int64_t *top1, double *cmax,
                  int64_t K, double *kv, int64_t *ki, int nt) {
    acc_t a = {m, s, t, best, top1, cmax, K, kv, ki};
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = r0; r < r1; r++) row_fold(z + r * ld, C, offset, r, row_max(z + r * ld, C), a);
}

/* The additive `layer` rows, folded without being written: for token i (of n), raw(H^l) = raw(H^{l-1}) +
   (raw(A^l) + raw(F^l)) with torch's rounding, l = 1..nl, where raw(H^0) is row h + i, A^l row ia + (l-1) n + i
   and F^l row jf + (l-1) n + i of z. The running row raw(H^l) stays in a per-thread buffer in L1 (rows
   h + n.. of z are left unwritten), so each step reads two rows of z instead of three and writes none;
   its stats go to accumulator row h + l n + i. Returns 0, or 1 if a thread could not allocate its buffer. */
int layer_update(float *z, int64_t ld, int64_t ia, int64_t jf, int64_t h, int64_t n, int64_t nl,
                  int64_t C, int64_t offset, double *m, double *s, double *t, double *best, int64_t *top1,
                  double *cmax, int64_t K, double *kv, int64_t *ki, int nt) {
    acc_t a = {m, s, t, best, top1, cmax, K, kv, ki};
    int64_t Cv = C - C % L;
    int failed = 0;
    #pragma omp parallel num_threads(nt)
    {
        float *run = malloc(C * sizeof(float));
        if (!run) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            if (!run) continue;
            memcpy(run, z + (h + i) * ld, C * sizeof(float));
            for (int64_t l = 1; l <= nl; l++) {
                const float *pa = z + (ia + (l - 1) * n + i) * ld, *pf = z + (jf + (l - 1) * n + i) * ld;
                float mx = -INFINITY;
                if (Cv) {
                    vf vm = load(run) + (load(pa) + load(pf));
                    memcpy(run, &vm, sizeof vm);
                    for (int64_t j = L; j < Cv; j += L) {
                        vf v = load(run + j) + (load(pa + j) + load(pf + j));
                        memcpy(run + j, &v, sizeof v);
                        vm = sel(v > vm, v, vm);
                    }
                    mx = hmax(vm);
                }
                for (int64_t j = Cv; j < C; j++) { run[j] += pa[j] + pf[j]; mx = run[j] > mx ? run[j] : mx; }
                row_fold(run, C, offset, h + l * n + i, mx, a);
            }
        }
        free(run);
    }
    return failed;
}
"""

_FLAGS = {"AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx2",
                     "-mprefer-vector-width=512", "-DVBYTES=64"],
          "AVX2": ["-mavx2", "-mfma", "-DVBYTES=32"]}


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


def _build() -> ctypes.CDLL:
    """Compile SOURCE once per (source, ISA, compiler) into the per-user cache and load it."""
    cc = compiler()
    if cc is None:
        raise UserError("kernel='native' needs a C compiler (cc, gcc or clang on PATH, or $CC); "
                        "use kernel='eager'")
    base = ["-O3", "-fPIC", "-shared", "-fno-math-errno", *_FLAGS.get(isa(), [])]
    err = ""
    for omp in (True, False):  # OpenMP (torch's thread team) where the compiler has it, else serial
        flags = base + (["-fopenmp"] if omp else [])
        key = hashlib.sha256("\0".join([SOURCE, cc, *flags]).encode()).hexdigest()[:16]
        out = _cache_dir() / f"chunk_{isa().lower()}_{'omp_' if omp else ''}{key}.so"
        if not out.exists():
            log.info("native kernel: compiling %s with %s (%s%s)", out.name, cc, isa(), ", OpenMP" if omp else "")
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                src, so = Path(tmp) / "k.c", Path(tmp) / "k.so"
                src.write_text(SOURCE)
                r = subprocess.run([cc, *flags, str(src), "-o", str(so), "-lm"], capture_output=True, text=True)
                if r.returncode:
                    err = err or (r.stderr.strip().splitlines() or ["?"])[0][:200]
                    if omp:
                        log.info("native kernel: %s cannot build it with OpenMP (%s); building it serial (one "
                                 "thread)", cc, err)
                    continue
                os.replace(so, out)  # atomic: concurrent builders never load a half-written file
        lib = ctypes.CDLL(str(out))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.chunk_update.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, p, p, p, i64, p, p, ctypes.c_int]
        lib.chunk_update.restype = None
        lib.layer_update.argtypes = [p, i64, i64, i64, i64, i64, i64, i64, i64, p, p, p, p, p, p, i64, p, p,
                                     ctypes.c_int]
        lib.layer_update.restype = ctypes.c_int
        lib.openmp = omp
        log.debug("native kernel: loaded %s", out)
        return lib
    raise UserError(f"kernel='native': {cc} failed ({err}); use kernel='eager'")


def threading() -> str:
    """How the kernel's rows are spread over threads: `openmp` (torch's team) or `serial` (one thread)."""
    return "openmp" if load().openmp else "serial"


def load() -> ctypes.CDLL:
    """The built kernel (built on first call in the process)."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib


def _topk_args(topk: tuple | None) -> tuple[int, int, int]:
    """(K, values ptr, ids ptr) of a running top-K (kv (R, K) fp64, ki (R, K) int64, contiguous), or none."""
    if topk is None:
        return 0, 0, 0
    kv, ki = topk
    assert kv.dtype == torch.float64 and ki.dtype == torch.int64 and kv.is_contiguous() and ki.is_contiguous()
    return kv.shape[1], kv.data_ptr(), ki.data_ptr()


def chunk_update(z: torch.Tensor, offset: int, m, s, t, best, top1, cmax, rows: int | None = None,
                 topk: tuple | None = None) -> None:
    """Fold rows [0, rows) (default all) of chunk z (R, C) fp32 (unit column stride), ids [offset, offset + C),
    into the row accumulators.

    m, s, t, best, cmax: (R,) fp64 contiguous CPU tensors (cmax is written: the chunk's row maxima);
    top1: (R,) int64. topk = (kv (R, K) fp64, ki (R, K) int64): each row's running top-K logits and ids,
    updated in place (start at -inf / -1). Rows are split over torch.get_num_threads() OpenMP threads (one
    thread if serial).
    """
    lib = load()
    R, C = z.shape
    R = R if rows is None else rows
    assert z.dtype == torch.float32 and z.stride(1) == 1 and z.device.type == "cpu"
    nt = max(1, min(torch.get_num_threads(), R // 16)) if lib.openmp else 1
    lib.chunk_update(z.data_ptr(), z.stride(0), 0, R, C, offset,
                     *[a.data_ptr() for a in (m, s, t, best, top1, cmax)], *_topk_args(topk), nt)


def layer_update(z: torch.Tensor, offset: int, ia: int, jf: int, h: int, n: int, nl: int,
                 m, s, t, best, top1, cmax, topk: tuple | None = None) -> None:
    """Fold the additive `layer` rows h + n .. h + nl·n (raw(H^l) = raw(H^{l-1}) + raw(A^l) + raw(F^l), H^0 at
    rows h .. h + n, A^l at ia + (l-1)·n, F^l at jf + (l-1)·n, n tokens each) into their accumulators.

    The sums round exactly as decode's torch combine does, but are never written to z: each token's
    running row stays in a per-thread L1 buffer. Threads split the n tokens (OpenMP build) or the whole
    call runs on one thread (serial build).
    """
    lib = load()
    assert z.dtype == torch.float32 and z.stride(1) == 1 and z.device.type == "cpu"
    nt = max(1, min(torch.get_num_threads(), n)) if lib.openmp else 1
    if lib.layer_update(z.data_ptr(), z.stride(0), ia, jf, h, n, nl, z.shape[1], offset,
                        *[a.data_ptr() for a in (m, s, t, best, top1, cmax)], *_topk_args(topk), nt):
        raise MemoryError(f"native.layer_update: no memory for a {z.shape[1]}-logit row buffer")
