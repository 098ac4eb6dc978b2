"""A single-read cross-entropy HVP for Hopper: each row held on chip by a cluster of CTAs.

Per row r with a target and p = softmax(x_r): ``out_r = scale * (p * u_r - p * <p, u_r>)``;
other rows are exact zeros. The Triton kernels must read a row twice (the output needs the whole
row's softmax numbers first) and hope the second read hits L2; rows of 0.2-1 MB times 132 SMs
exceed the 50 MB L2 at large vocabularies. Here a thread-block cluster of C CTAs (on C SMs)
splits the row: each CTA copies its segment of x and u once from memory into shared memory
(cp.async, every copy in flight at once), then computes per-thread running (max, sum exp,
sum exp * u) from it; the CTA's partial numbers go to its shared memory, one cluster barrier,
and every CTA merges the C partials read through distributed shared memory, then writes its
segment's output from shared memory while the next row's entries are copied into the freed
slots. Memory sees x and u read once and the output written once (the bandwidth floor's bytes).

Written in CUDA C++ (Triton exposes neither clusters' shared memory nor their barriers) and
compiled at first use with NVRTC through ``torch.cuda._compile_kernel``, so nothing is built at
install time. Taken only where it applies: sm_90 or newer, fp32/bf16/fp16 with x, u and out of
one dtype, rows contiguous and 16-byte aligned (V a multiple of 4 in fp32, of 8 in 16-bit); the
dispatcher uses the Triton kernels elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ._ce_hvp_common import fastest_config, pick_config

__all__ = [
    "candidate_clusters",
    "candidate_configs",
    "ce_hvp_cluster",
    "kernel_source",
    "resident_clusters",
    "segment_vectors",
    "tune",
    "why_not",
]

THREADS = 512
# Shared memory a CTA may give its segments of x and u (227 KB is a CTA's opt-in limit on sm_90;
# the kernel's own arrays take 240 bytes).
_MAX_SEGMENT_BYTES = 225 * 1024
# Rows shorter than this stay on the Triton kernels (one CTA streams such a row in microseconds;
# the cluster's barrier per row would dominate). Measured from V = 50304.
MIN_VOCAB = 16384
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#define CLUSTER {cluster}
#define THREADS {threads}
#define EPV {epv}            // elements per 16-byte vector
#define NWARPS (THREADS / 32)

__device__ __forceinline__ void unpack(const uint4 v, float* f) {{
{unpack}
}}

__device__ __forceinline__ uint4 pack(const float* f) {{
    uint4 v;
{pack}
    return v;
}}

// Lane-wise online softmax: (m, s, t) <- element x with tangent w; one exp per element.
__device__ __forceinline__ void merge_one(float& m, float& s, float& t, float x, float w) {{
    const float e = __expf(-fabsf(x - m));
    const bool grow = x > m;
    const float keep = grow ? e : 1.0f;
    const float add = grow ? 1.0f : e;
    s = s * keep + add;
    t = t * keep + add * w;
    m = grow ? x : m;
}}

__device__ __forceinline__ void merge_stats(float& m, float& s, float& t, float m2, float s2, float t2) {{
    const float big = fmaxf(m, m2);
    const float a = __expf(m - big), b = __expf(m2 - big);
    s = s * a + s2 * b;
    t = t * a + t2 * b;
    m = big;
}}

__device__ __forceinline__ void copy_async(uint4* shared, const uint4* global) {{
    const u32 address = (u32)__cvta_generic_to_shared(shared);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(address), "l"(global) : "memory");
}}

__device__ __forceinline__ void cluster_sync() {{
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}}

__device__ __forceinline__ float load_remote(const float* local, u32 rank) {{
    u32 address = (u32)__cvta_generic_to_shared(local), remote;
    float value;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(value) : "r"(remote) : "memory");
    return value;
}}

__device__ __forceinline__ bool has_target(long long row, int seq_len, const long long* labels,
                                           int has_labels, int shift, int ignore_index) {{
    const long long position = row % seq_len;
    long long label_row = row;
    if (shift) {{
        if (position == seq_len - 1) return false;
        label_row = row + 1;
    }}
    return !has_labels || labels[label_row] != (long long)ignore_index;
}}

extern "C" __global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(THREADS)
ce_hvp_cluster(const uint4* __restrict__ x, const uint4* __restrict__ u, uint4* out,
               const long long* __restrict__ labels, const float* __restrict__ scale_ptr,
               int num_rows, int seq_len, int row_vecs, int seg_vecs,
               int ignore_index, int has_labels, int shift) {{
    // Shared memory: [seg_vecs] of x, then [seg_vecs] of u. The next row's entries are copied
    // in as this row's output is written (each slot right after its last read), so loads stay
    // in flight through the output phase.
    extern __shared__ uint4 smem[];
    uint4* xs = smem;
    uint4* us = smem + seg_vecs;
    __shared__ float partial[2][3];             // this CTA's (max, norm, dot), by row parity
    __shared__ float warp_stats[NWARPS][3];
    __shared__ float row_stats[3];
    const u32 rank = blockIdx.x % CLUSTER;
    const int cluster_id = blockIdx.x / CLUSTER;
    const int num_clusters = gridDim.x / CLUSTER;
    const int first = rank * seg_vecs;
    const int count = max(0, min(seg_vecs, row_vecs - first));
    const float scale = scale_ptr[0];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    // The next row with a target from ``row`` on (this cluster's rows); zeros for the others.
    auto next_row = [&](long long row) {{
        while (row < num_rows && !has_target(row, seq_len, labels, has_labels, shift, ignore_index)) {{
            const long long base = row * (long long)row_vecs + first;
            for (int i = tid; i < count; i += THREADS) out[base + i] = zero;
            row += num_clusters;
        }}
        return row;
    }};
    // Each thread copies, and later reads back, the same entries: no barrier around the buffer.
    auto fetch = [&](long long row) {{
        const long long base = row * (long long)row_vecs + first;
        for (int i = tid; i < count; i += THREADS) {{
            copy_async(xs + i, x + base + i);
            copy_async(us + i, u + base + i);
        }}
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    }};
    int parity = 0;
    long long row = next_row(cluster_id);
    if (row < num_rows) fetch(row);
    while (row < num_rows) {{
        const long long next = next_row(row + num_clusters);
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        float m = -3.402823466e38f, s = 0.0f, t = 0.0f;
        for (int i = tid; i < count; i += THREADS) {{
            float xf[EPV], uf[EPV];
            unpack(xs[i], xf);
            unpack(us[i], uf);
            #pragma unroll
            for (int e = 0; e < EPV; ++e) merge_one(m, s, t, xf[e], uf[e]);
        }}
        // The CTA's numbers: across the warp, then across warps.
        #pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {{
            merge_stats(m, s, t, __shfl_xor_sync(0xffffffffu, m, offset),
                        __shfl_xor_sync(0xffffffffu, s, offset),
                        __shfl_xor_sync(0xffffffffu, t, offset));
        }}
        if (lane == 0) {{
            warp_stats[warp][0] = m; warp_stats[warp][1] = s; warp_stats[warp][2] = t;
        }}
        __syncthreads();
        if (warp == 0) {{
            m = -3.402823466e38f; s = 0.0f; t = 0.0f;
            if (lane < NWARPS) {{ m = warp_stats[lane][0]; s = warp_stats[lane][1]; t = warp_stats[lane][2]; }}
            #pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {{
                merge_stats(m, s, t, __shfl_xor_sync(0xffffffffu, m, offset),
                            __shfl_xor_sync(0xffffffffu, s, offset),
                            __shfl_xor_sync(0xffffffffu, t, offset));
            }}
            if (lane == 0) {{
                partial[parity][0] = m; partial[parity][1] = s; partial[parity][2] = t;
            }}
        }}
        // The row's numbers: every CTA's partial, through distributed shared memory. A slot is
        // written again two rows later, after the next cluster barrier: all peers have read it.
        cluster_sync();
        if (warp == 0) {{
            m = -3.402823466e38f; s = 0.0f; t = 0.0f;
            if (lane < CLUSTER) {{
                m = load_remote(&partial[parity][0], lane);
                s = load_remote(&partial[parity][1], lane);
                t = load_remote(&partial[parity][2], lane);
            }}
            #pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {{
                merge_stats(m, s, t, __shfl_xor_sync(0xffffffffu, m, offset),
                            __shfl_xor_sync(0xffffffffu, s, offset),
                            __shfl_xor_sync(0xffffffffu, t, offset));
            }}
            if (lane == 0) {{ row_stats[0] = m; row_stats[1] = s; row_stats[2] = t; }}
        }}
        __syncthreads();
        const float row_max = row_stats[0];
        const float coef = scale / row_stats[1];
        const float mean_u = row_stats[2] / row_stats[1];
        const long long base = row * (long long)row_vecs + first;
        const long long next_base = next * (long long)row_vecs + first;
        const bool refill = next < num_rows;
        for (int j = tid; j < count; j += THREADS) {{
            float xf[EPV], uf[EPV], of[EPV];
            unpack(xs[j], xf);
            unpack(us[j], uf);
            #pragma unroll
            for (int e = 0; e < EPV; ++e) of[e] = __expf(xf[e] - row_max) * coef * (uf[e] - mean_u);
            __stcs(out + base + j, pack(of));
            if (refill) {{
                copy_async(xs + j, x + next_base + j);
                copy_async(us + j, u + next_base + j);
            }}
        }}
        asm volatile("cp.async.commit_group;\n" ::: "memory");
        parity ^= 1;
        row = next;
    }}
    cluster_sync();  // no CTA leaves while a peer may still read its shared memory
}}
"""

_UNPACK = {
    "f32": "    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);\n"
    "    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);",
    "bf16": "    const u32 w[4] = {v.x, v.y, v.z, v.w};\n"
    "    #pragma unroll\n"
    "    for (int k = 0; k < 4; ++k) {\n"
    "        f[2 * k] = __uint_as_float(w[k] << 16);\n"
    "        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);\n"
    "    }",
    "f16": "    const u32 w[4] = {v.x, v.y, v.z, v.w};\n"
    "    #pragma unroll\n"
    "    for (int k = 0; k < 4; ++k) {\n"
    "        const u16 lo = (u16)(w[k] & 0xffffu), hi = (u16)(w[k] >> 16);\n"
    '        asm("cvt.f32.f16 %0, %1;" : "=f"(f[2 * k]) : "h"(lo));\n'
    '        asm("cvt.f32.f16 %0, %1;" : "=f"(f[2 * k + 1]) : "h"(hi));\n'
    "    }",
}
_PACK = {
    "f32": "    v.x = __float_as_uint(f[0]); v.y = __float_as_uint(f[1]);\n"
    "    v.z = __float_as_uint(f[2]); v.w = __float_as_uint(f[3]);",
    "bf16": "    u32 w[4];\n"
    "    #pragma unroll\n"
    "    for (int k = 0; k < 4; ++k) {\n"
    "        u16 lo, hi;\n"
    '        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(lo) : "f"(f[2 * k]));\n'
    '        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(hi) : "f"(f[2 * k + 1]));\n'
    "        w[k] = (u32)lo | ((u32)hi << 16);\n"
    "    }\n"
    "    v.x = w[0]; v.y = w[1]; v.z = w[2]; v.w = w[3];",
    "f16": "    u32 w[4];\n"
    "    #pragma unroll\n"
    "    for (int k = 0; k < 4; ++k) {\n"
    "        u16 lo, hi;\n"
    '        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(f[2 * k]));\n'
    '        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(f[2 * k + 1]));\n'
    "        w[k] = (u32)lo | ((u32)hi << 16);\n"
    "    }\n"
    "    v.x = w[0]; v.y = w[1]; v.z = w[2]; v.w = w[3];",
}


def kernel_source(dtype: torch.dtype, cluster: int, threads: int = THREADS) -> str:
    """The CUDA C++ source for one dtype and cluster size (NVRTC or nvcc)."""
    name = _DTYPES[dtype]
    return _SOURCE.format(
        cluster=cluster,
        threads=threads,
        epv=4 if name == "f32" else 8,
        unpack=_UNPACK[name],
        pack=_PACK[name],
    )


def segment_vectors(vocab: int, element_size: int, cluster: int) -> int:
    """16-byte vectors of x (and of u) in one CTA's segment of a row."""
    return -(-(vocab * element_size // 16) // cluster)


def candidate_clusters(vocab: int, element_size: int) -> list[int]:
    """Cluster sizes worth timing: the smallest (at least 2) whose CTA holds its segments of x
    and u in ``_MAX_SEGMENT_BYTES``, and twice that (more, smaller CTAs per SM), up to 8.

    Measured on an H100 (2026-12-07, % of the bandwidth floor): fp32 V=50304: C=2 93.6, C=4
    89.9; bf16 V=50304: C=2 90.4, C=4 82.1; bf16 V=128256: C=4 81.6, C=8 83.0; fp32 V=128256:
    C=8 86.4 (C=16, non-portable, 78.3)."""
    sizes = []
    for cluster in (2, 4, 8):
        if 2 * 16 * segment_vectors(vocab, element_size, cluster) <= _MAX_SEGMENT_BYTES:
            sizes.append(cluster)
    return sizes[:2]


class _LaunchConfig(ctypes.Structure):
    """The driver's ``CUlaunchConfig`` (cuda.h), for the occupancy query."""

    _fields_ = [
        ("grid_x", ctypes.c_uint),
        ("grid_y", ctypes.c_uint),
        ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint),
        ("block_y", ctypes.c_uint),
        ("block_z", ctypes.c_uint),
        ("shared_bytes", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attributes", ctypes.c_void_p),
        ("num_attributes", ctypes.c_uint),
    ]


def resident_clusters(
    kernel, cluster: int, shared_bytes: int, device: torch.device, threads: int = THREADS
) -> int:
    """Clusters that can run at once (``cuOccupancyMaxActiveClusters``): a cluster's CTAs must
    share a GPC, so this is below SMs x CTAs per SM / C. Launching more than this runs a second
    wave of rows (measured: 66 clusters of 4 took 5.1 ms where 59 took 3.9). Falls back to 85%
    of the naive count if the driver call is not available."""
    try:
        libcuda = torch.cuda._utils._get_gpu_runtime_library()
        count = ctypes.c_int(0)
        config = _LaunchConfig(cluster, 1, 1, threads, 1, 1, shared_bytes, None, None, 0)
        status = libcuda.cuOccupancyMaxActiveClusters(
            ctypes.byref(count), kernel.func, ctypes.byref(config)
        )
        if status == 0 and count.value > 0:
            return int(count.value)
    except (AttributeError, OSError):
        pass
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    naive = max(1, sms * max(1, (228 * 1024) // (shared_bytes + 2048)) // cluster)
    return max(1, int(0.85 * naive))


def why_not(logits: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None) -> str | None:
    """None when this kernel can take the call, else why not: it needs sm_90+, one dtype of
    fp32/bf16/fp16 for x, u and out, contiguous 16-byte aligned rows of at least ``MIN_VOCAB``
    entries that a cluster of at most 8 CTAs can hold, and NVRTC reachable through torch.
    ``out=None`` stands for a fresh (contiguous, aligned) output in the logits' dtype."""
    if not logits.is_cuda:
        return f"needs CUDA tensors (got {logits.device})"
    major, minor = torch.cuda.get_device_capability(logits.device)
    if major < 9:
        return f"needs an sm_90 (Hopper) or newer GPU (this one is sm_{major}{minor})"
    out_dtype = logits.dtype if out is None else out.dtype
    if logits.dtype not in _DTYPES or u.dtype != logits.dtype or out_dtype != logits.dtype:
        return (
            f"needs logits, u and out of one dtype of fp32/bf16/fp16 (got {logits.dtype}, "
            f"{u.dtype}, {out_dtype})"
        )
    if getattr(torch.cuda, "_compile_kernel", None) is None:
        return "needs torch.cuda._compile_kernel (NVRTC through torch), which this torch lacks"
    vocab, element_size = logits.shape[-1], logits.element_size()
    if vocab < MIN_VOCAB:
        return f"needs V >= {MIN_VOCAB} (got {vocab}): shorter rows stay on the two-pass kernel"
    if (vocab * element_size) % 16:
        return f"needs rows of a multiple of 16 bytes (V={vocab} x {element_size} bytes)"
    if not candidate_clusters(vocab, element_size):
        return f"a row of V={vocab} does not fit the shared memory of a cluster of 8 CTAs"
    tensors = (logits, u) if out is None else (logits, u, out)
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors):
        return "needs contiguous, 16-byte aligned logits, u and out"
    return None


_lock = threading.Lock()
_kernels: dict[tuple, Any] = {}  # (dtype, cluster, device index) -> compiled kernel
_resident: dict[tuple, int] = {}  # (dtype, cluster, device index, shared bytes) -> clusters


@dataclass
class _Launcher:
    """A compiled kernel and how many of its clusters run at once with this shared memory."""

    kernel: Any
    shared_bytes: int
    resident: int


def _launcher(
    dtype: torch.dtype, cluster: int, seg_vecs: int, device: torch.device, threads: int = THREADS
) -> _Launcher:
    """Compiled on first use per (dtype, cluster size, device, threads) with NVRTC, its
    dynamic shared memory limit raised once to ``_MAX_SEGMENT_BYTES``; the resident cluster
    count is queried once per shared-memory size."""
    shared = 2 * seg_vecs * 16
    with _lock:
        key = (dtype, cluster, device.index, threads)
        if key not in _kernels:
            major, minor = torch.cuda.get_device_capability(device)
            with torch.cuda.device(device):
                kernel = torch.cuda._compile_kernel(
                    kernel_source(dtype, cluster, threads),
                    "ce_hvp_cluster",
                    compute_capability=f"{major}{minor}",
                )
                kernel.set_shared_memory_config(_MAX_SEGMENT_BYTES)
            _kernels[key] = kernel
        kernel = _kernels[key]
        occupancy_key = key + (shared,)
        if occupancy_key not in _resident:
            with torch.cuda.device(device):
                _resident[occupancy_key] = resident_clusters(
                    kernel, cluster, shared, device, threads
                )
        return _Launcher(kernel, shared, _resident[occupancy_key])


def launch(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    config: tuple[int, int],
    num_clusters: int | None = None,
) -> None:
    """One launch with ``config`` = (cluster size, threads per CTA), all resident clusters
    unless ``num_clusters``."""
    cluster, threads = config
    batch, seq_len, vocab = logits.shape
    num_rows = batch * seq_len
    if num_rows == 0:
        return
    seg_vecs = segment_vectors(vocab, logits.element_size(), cluster)
    device = logits.device
    launcher = _launcher(logits.dtype, cluster, seg_vecs, device, threads)
    if isinstance(scale, torch.Tensor):
        scale_tensor = scale.to(device=device, dtype=torch.float32).reshape(1)
    else:
        scale_tensor = torch.full((1,), scale, dtype=torch.float32, device=device)
    labels_arg = (
        torch.empty(1, dtype=torch.int64, device=device)
        if labels is None
        else labels.to(device=device, dtype=torch.int64).contiguous()
    )
    clusters = max(1, min(num_rows, num_clusters or launcher.resident))
    launcher.kernel(
        grid=(clusters * cluster, 1, 1),
        block=(threads, 1, 1),
        args=[
            logits,
            u,
            out,
            labels_arg,
            scale_tensor,
            num_rows,
            seq_len,
            vocab * logits.element_size() // 16,
            seg_vecs,
            int(ignore_index),
            int(labels is not None),
            int(shift),
        ],
        shared_mem=launcher.shared_bytes,
    )


_tuned: dict[tuple, tuple[int, int]] = {}
_tuning_timings: dict[tuple, dict[tuple[int, int], float]] = {}


def candidate_configs(vocab: int, element_size: int) -> list[tuple[int, int]]:
    """(cluster size, threads per CTA) pairs the tuner times. Measured on an H100: 256 threads
    beat 512 in bf16 (V=128256, C=8: 84.8 vs 82.9 % of the floor; V=50304, C=2: 92.1 vs 90.4)
    and tie in fp32; 1024 was slower everywhere."""
    return [(c, t) for c in candidate_clusters(vocab, element_size) for t in (256, 512)]


def tune(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    tune_rows: int | None = None,
) -> tuple[tuple[int, int], dict[tuple[int, int], float]]:
    """Time every candidate config (median ms); return the fastest and all times."""
    run = functools.partial(launch, ignore_index=ignore_index, shift=shift, scale=scale)
    candidates = candidate_configs(logits.shape[-1], logits.element_size())
    return fastest_config(
        run, candidates, logits, u, labels, out, tune_rows=tune_rows, kernel_name="cluster kernel"
    )


def ce_hvp_cluster(
    logits: torch.Tensor,
    u: torch.Tensor,
    labels: torch.Tensor | None,
    out: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    scale: torch.Tensor | float,
    cluster: int | None = None,
    threads: int = THREADS,
) -> torch.Tensor:
    """Write the product into ``out`` (may be ``u``); logits, u, out (B, T, V) as
    :func:`why_not` allows, labels (B, T) or None. ``cluster=None`` times the candidate
    (cluster size, threads) configs once per (device, V, dtype) on the leading rows (about
    512 MB of logits), unless TORCH_LINOP_CE_HVP_AUTOTUNE=0 (then the first candidate)."""
    if out.numel() == 0:
        return out
    vocab, element_size = logits.shape[-1], logits.element_size()
    config = (cluster, threads) if cluster is not None else None
    if config is None:
        tune_rows = max(2048, (1 << 29) // (vocab * element_size))
        config = pick_config(
            (logits.device.index, vocab, logits.dtype),
            _tuned,
            _tuning_timings,
            lambda: candidate_configs(vocab, element_size)[0],
            lambda: tune(
                logits,
                u,
                labels,
                out,
                ignore_index=ignore_index,
                shift=shift,
                scale=scale,
                tune_rows=tune_rows,
            ),
        )
    launch(
        logits, u, labels, out, ignore_index=ignore_index, shift=shift, scale=scale, config=config
    )
    return out
