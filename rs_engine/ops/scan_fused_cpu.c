/* Fused CPU selective scan, Mamba-1 semantics (Gu & Dao 2023, eq. 2a-2b), forward and backward.
 *
 * One pass per (batch, channel) row over the sequence, the state (dstate floats) kept in registers or L1, never a
 * (L, dim, dstate) tensor in memory: the design of mamba-ssm's CUDA kernel (selective_scan_fwd_kernel.cuh) and of
 * llama.cpp's CPU ssm_scan, written as plain C whose inner loops the compiler vectorises for the machine it runs
 * on (-O3 -march=native: AVX2, AVX-512 or NEON). rs_engine/ops/scan_fused.py compiles it on first use.
 *
 * Tokens go in blocks of `blk`: per block, the elementwise parts (softplus, exp(delta*A), silu) are SIMD loops
 * over the whole block, and only the recurrence h = a*h + w is sequential. The forward can store the state at
 * every block start (ckpt); the backward recomputes each block's states from it, in reverse block order, then
 * runs the adjoint recurrence backwards, as mamba-ssm's backward kernel does per chunk.
 *
 * Layout (float32, C-contiguous): u, delta, z, out: (batch, dim, L); A: (dim, N); Bm, Cm: (batch, G, L, N), the
 * token-major transpose of mamba-ssm's (batch, G, N, L), channel d reading group d / (dim / G); D, bias: (dim,)
 * or NULL; last: (batch, dim, N); ckpt: (batch, dim, nblk, N) or NULL. Threads split the channels (OpenMP).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define SOFTPLUS_THRESHOLD 20.0f /* as mamba-ssm and torch.nn.functional.softplus: above it softplus(x) = x */
#define BLK_MAX 256
#define CT 16 /* channels per tile: a block of B and C (blk x N each) is read from L1 by all of them */
/* per-thread scratch: raw, dt, dtu, y | gy (4 blocks), partial sums (8 blocks), a (N blocks), tile states */
#define WORK_FLOATS(N) ((12 + (N)) * BLK_MAX + (N) + CT * (N))

/* exp(x), Cephes expf: x = k ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative error ~1 ulp. Inputs below
 * -87.34 give 2^-126 (the smallest normal) instead of a denormal or 0: decays that small reset the state either
 * way. Branch-free so that loops over it vectorise. */
static inline float exp_f(float x) {
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.0f ? 88.0f : x;
    float kf = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest (1.5 * 2^23) */
    float r = x - kf * 0.693359375f;
    r = r + kf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)kf + 127) << 23;
    return p * s.f;
}

/* log(y) for y in [1, 2], Cephes logf's polynomial around 1 (after halving y above sqrt 2). */
static inline float log_1to2(float y) {
    float e = y > 1.41421356f ? 1.0f : 0.0f;
    float x = (y > 1.41421356f ? 0.5f * y : y) - 1.0f;
    float z = x * x;
    float p = 7.0376836292e-2f;
    p = p * x - 1.1514610310e-1f;
    p = p * x + 1.1676998740e-1f;
    p = p * x - 1.2420140846e-1f;
    p = p * x + 1.4249322787e-1f;
    p = p * x - 1.6668057665e-1f;
    p = p * x + 2.0000714765e-1f;
    p = p * x - 2.4999993993e-1f;
    p = p * x + 3.3333331174e-1f;
    p = p * x * z - 2.12194440e-4f * e - 0.5f * z;
    return x + p + 0.693359375f * e;
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p by Goldberg's correction log(1+e) * e / ((1+e) - 1). */
static inline float softplus_f(float x) {
    float e = exp_f(-fabsf(x));
    float v = 1.0f + e;
    float d = v - 1.0f;
    float l1p = d == 0.0f ? e : log_1to2(v) * (e / (d == 0.0f ? 1.0f : d));
    float s = (x > 0.0f ? x : 0.0f) + l1p;
    return x > SOFTPLUS_THRESHOLD ? x : s;
}

static inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

typedef float v8f __attribute__((vector_size(32), aligned(4))); /* GCC/Clang generic vectors: any ISA */

/* sum_n x[n] * y[n]; for dstate 16 as two 8-lane vectors and a pairwise tree (an ordered scalar sum per token
 * is a chain of dependent adds, the slowest part of the loop). */
static inline __attribute__((always_inline)) float dot(const float *x, const float *y, int64_t N) {
    if (N == 16) {
        v8f p = *(const v8f *)x * *(const v8f *)y + *(const v8f *)(x + 8) * *(const v8f *)(y + 8);
        return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
    }
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; n++) acc += x[n] * y[n];
    return acc;
}

#ifdef __AVX__
#include <immintrin.h>
#endif

/* y[t] = sum_j part[8 t + j] for t < m: with AVX, 8 rows at a time by horizontal adds (3 adds per row instead of
 * a 7-add tree per token); elsewhere the scalar tree. */
static inline void row_sums8(const float *part, int64_t m, float *y) {
    int64_t t = 0;
#ifdef __AVX__
    for (; t + 8 <= m; t += 8) {
        const float *p = part + 8 * t;
        __m256 a0 = _mm256_hadd_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
        __m256 a1 = _mm256_hadd_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24));
        __m256 a2 = _mm256_hadd_ps(_mm256_loadu_ps(p + 32), _mm256_loadu_ps(p + 40));
        __m256 a3 = _mm256_hadd_ps(_mm256_loadu_ps(p + 48), _mm256_loadu_ps(p + 56));
        __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
        /* b0 lanes: rows 0-3 (low half), rows 0-3 (high half); b1: rows 4-7 likewise */
        __m256 lo = _mm256_permute2f128_ps(b0, b1, 0x20), hi = _mm256_permute2f128_ps(b0, b1, 0x31);
        _mm256_storeu_ps(y + t, _mm256_add_ps(lo, hi));
    }
#endif
    for (; t < m; t++) {
        const float *p = part + 8 * t;
        y[t] = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
    }
}

/* Per block: dt = softplus(delta + bias) (or delta + bias), raw = delta + bias, dtu = dt * u, a = exp(dt * A). */
static inline __attribute__((always_inline)) void block_inputs(const float *u, const float *delta, float bias,
                                                               int softplus, const float *Ad, int64_t m, int64_t N,
                                                               float *raw, float *dt, float *dtu, float *a) {
#pragma omp simd
    for (int64_t t = 0; t < m; t++) {
        float x = delta[t] + bias;
        raw[t] = x;
        float v = softplus ? softplus_f(x) : x;
        dt[t] = v;
        dtu[t] = v * u[t];
    }
    for (int64_t t = 0; t < m; t++) {
        float v = dt[t];
#pragma omp simd
        for (int64_t n = 0; n < N; n++) a[t * N + n] = exp_f(v * Ad[n]);
    }
}

/* 64-byte aligned scratch (aligned_alloc wants a size that is a multiple of the alignment). */
static float *alloc_floats(int64_t n) { return aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64); }

/* Rows of one batch item and channel tile, all in group g: channels [d0, d1) of batch b. */
typedef struct {
    int64_t b, g, d0, d1;
} Tile;

static inline Tile tile_at(int64_t i, int64_t G, int64_t dpg, int64_t tpg, int64_t per_batch) {
    Tile T;
    T.b = per_batch ? i / (G * tpg) : 0;
    T.g = (i / tpg) % G;
    T.d0 = T.g * dpg + (i % tpg) * CT;
    T.d1 = T.d0 + CT < (T.g + 1) * dpg ? T.d0 + CT : (T.g + 1) * dpg;
    return T;
}

/* One block of one row: tokens [t0, t0 + m), state h (N) updated in place, out written. */
static inline __attribute__((always_inline)) void block_forward(
    int64_t N, int64_t t0, int64_t m, const float *u, const float *delta, const float *z, const float *Ad,
    const float *Bt, const float *Ct, float Dd, float bias, int softplus, float *h, float *out, float *work) {
    float *raw = work, *dt = raw + BLK_MAX, *dtu = dt + BLK_MAX, *y = dtu + BLK_MAX, *part = y + BLK_MAX;
    float *a = part + 8 * BLK_MAX;
    block_inputs(u + t0, delta + t0, bias, softplus, Ad, m, N, raw, dt, dtu, a);
    if (N == 16) {  /* per token one 8-lane partial sum; rows summed 8 tokens at a time after the loop */
        v8f h0 = *(v8f *)h, h1 = *(v8f *)(h + 8);
        for (int64_t t = 0; t < m; t++) {
            v8f w = (v8f){0} + dtu[t];
            h0 = *(const v8f *)(a + t * 16) * h0 + w * *(const v8f *)(Bt + t * 16);
            h1 = *(const v8f *)(a + t * 16 + 8) * h1 + w * *(const v8f *)(Bt + t * 16 + 8);
            *(v8f *)(part + 8 * t) = h0 * *(const v8f *)(Ct + t * 16) + h1 * *(const v8f *)(Ct + t * 16 + 8);
        }
        *(v8f *)h = h0;
        *(v8f *)(h + 8) = h1;
        row_sums8(part, m, y);
    } else if (N == 8) {  /* the hybrid models' dstate: the state is one 8-lane vector */
        v8f h0 = *(v8f *)h;
        for (int64_t t = 0; t < m; t++) {
            h0 = *(const v8f *)(a + t * 8) * h0 + dtu[t] * *(const v8f *)(Bt + t * 8);
            *(v8f *)(part + 8 * t) = h0 * *(const v8f *)(Ct + t * 8);
        }
        *(v8f *)h = h0;
        row_sums8(part, m, y);
    } else {
        for (int64_t t = 0; t < m; t++) {
            float w = dtu[t];
#pragma omp simd
            for (int64_t n = 0; n < N; n++) h[n] = a[t * N + n] * h[n] + w * Bt[t * N + n];
            y[t] = dot(h, Ct + t * N, N);
        }
    }
    /* Two loops, not one with `z ? ... : ...` inside: GCC if-converts that into a masked load of z, and with z NULL
     * (every model here) the all-false masked load of address 0 costs a microcode assist per vector on AMD Zen 3:
     * 40% of the kernel's time there (perf). */
    if (z) {
#pragma omp simd
        for (int64_t t = 0; t < m; t++) {
            float v = y[t] + Dd * u[t0 + t];
            out[t0 + t] = v * z[t0 + t] * sigmoid_f(z[t0 + t]);
        }
    } else {
#pragma omp simd
        for (int64_t t = 0; t < m; t++) out[t0 + t] = y[t] + Dd * u[t0 + t];
    }
}

static inline __attribute__((always_inline)) void tile_forward(
    int64_t N, Tile T, int64_t dim, int64_t L, int64_t G, int64_t blk, const float *u, const float *delta,
    const float *A, const float *Bm, const float *Cm, const float *D, const float *z, const float *bias,
    int softplus, float *out, float *last, float *ckpt, float *hs, float *work) {
    int64_t nblk = (L + blk - 1) / blk;
    const float *Bg = Bm + (T.b * G + T.g) * L * N, *Cg = Cm + (T.b * G + T.g) * L * N;
    memset(hs, 0, CT * N * sizeof(float));
    for (int64_t k = 0; k < nblk; k++) {  /* channels inner: the block's B and C stay in L1 across them */
        int64_t t0 = k * blk, m = L - t0 < blk ? L - t0 : blk;
        for (int64_t d = T.d0; d < T.d1; d++) {
            int64_t i = T.b * dim + d;
            float *h = hs + (d - T.d0) * N;
            if (ckpt) memcpy(ckpt + (i * nblk + k) * N, h, N * sizeof(float));
            block_forward(N, t0, m, u + i * L, delta + i * L, z ? z + i * L : NULL, A + d * N, Bg + t0 * N,
                          Cg + t0 * N, D ? D[d] : 0.0f, bias ? bias[d] : 0.0f, softplus, h, out + i * L, work);
        }
    }
    for (int64_t d = T.d0; d < T.d1; d++) memcpy(last + (T.b * dim + d) * N, hs + (d - T.d0) * N, N * sizeof(float));
}

/* Forward over all rows; threads split (batch, channel tile) pairs. */
void scan_fwd(int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t G, int64_t blk, const float *u,
              const float *delta, const float *A, const float *Bm, const float *Cm, const float *D, const float *z,
              const float *bias, int softplus, float *out, float *last, float *ckpt, int nthreads) {
    int64_t dpg = dim / G, tpg = (dpg + CT - 1) / CT;
#pragma omp parallel num_threads(nthreads)
    {
        float *work = alloc_floats(WORK_FLOATS(N));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batch * G * tpg; i++) {
            Tile T = tile_at(i, G, dpg, tpg, 1);
            float *hs = work + WORK_FLOATS(N) - CT * N;
            if (N == 16)  /* the common dstates: a constant trip count vectorises without remainder loops */
                tile_forward(16, T, dim, L, G, blk, u, delta, A, Bm, Cm, D, z, bias, softplus, out, last, ckpt,
                             hs, work);
            else if (N == 8)
                tile_forward(8, T, dim, L, G, blk, u, delta, A, Bm, Cm, D, z, bias, softplus, out, last, ckpt,
                             hs, work);
            else
                tile_forward(N, T, dim, L, G, blk, u, delta, A, Bm, Cm, D, z, bias, softplus, out, last, ckpt,
                             hs, work);
        }
        free(work);
    }
}

/* Backward of one block of one row, tokens [t0, t0 + m) in reverse; lam (N): the adjoint of the state after the
 * block, replaced by the one before it. Writes du, ddelta, dz; adds into dAr (N), the block's dB/dC rows of this
 * thread's accumulators, *dD, *dbias. ck: the state before the block. */
static inline __attribute__((always_inline)) void block_backward(
    int64_t N, int64_t t0, int64_t m, const float *u, const float *delta, const float *z, const float *Ad,
    const float *Bt, const float *Ct, float Dd, float bias, int softplus, const float *ck, const float *gout,
    float *lam, float *du, float *ddelta, float *dz, float *dAr, float *dBt, float *dCt, float *dD, float *dbias,
    float *work) {
    float *raw = work, *dt = raw + BLK_MAX, *dtu = dt + BLK_MAX, *gy = dtu + BLK_MAX, *a = gy + 9 * BLK_MAX;
    float *H = a + BLK_MAX * N; /* states of the block, (blk + 1, N): row 0 is the state before it */
    float dDr = 0.0f, dbr = 0.0f;
    block_inputs(u + t0, delta + t0, bias, softplus, Ad, m, N, raw, dt, dtu, a);
    memcpy(H, ck, N * sizeof(float));
    for (int64_t t = 0; t < m; t++) {
        float w = dtu[t];
#pragma omp simd
        for (int64_t n = 0; n < N; n++) H[(t + 1) * N + n] = a[t * N + n] * H[t * N + n] + w * Bt[t * N + n];
    }
    for (int64_t t = 0; t < m; t++) { /* gy = d out / d y; dz needs y, recomputed from the states */
        float g = gout[t0 + t];
        if (z) {
            float zt = z[t0 + t], s = sigmoid_f(zt), v = dot(H + (t + 1) * N, Ct + t * N, N) + Dd * u[t0 + t];
            dz[t0 + t] = g * v * s * (1.0f + zt * (1.0f - s));
            g *= zt * s;
        }
        gy[t] = g;
        dDr += g * u[t0 + t];
    }
    for (int64_t t = m - 1; t >= 0; t--) {
        float g = gy[t], dtt = dt[t], w = dtu[t], sa = 0.0f, sb = 0.0f;
#pragma omp simd reduction(+ : sa, sb)
        for (int64_t n = 0; n < N; n++) {
            float l = lam[n] + Ct[t * N + n] * g;          /* adjoint of h_t */
            dCt[t * N + n] += H[(t + 1) * N + n] * g;
            float q = l * H[t * N + n] * a[t * N + n];     /* through a_t = exp(dt * A) */
            sa += q * Ad[n];
            dAr[n] += q * dtt;
            sb += l * Bt[t * N + n];                       /* through w_t = dt * u * B */
            dBt[t * N + n] += l * w;
            lam[n] = l * a[t * N + n];                     /* carried to h_{t-1} */
        }
        float ddt = sa + sb * u[t0 + t];
        du[t0 + t] = sb * dtt + Dd * g;
        float dd = softplus && raw[t] <= SOFTPLUS_THRESHOLD ? ddt * sigmoid_f(raw[t]) : ddt;
        ddelta[t0 + t] = dd;
        dbr += dd;
    }
    *dD += dDr;
    *dbias += dbr;
}

static inline __attribute__((always_inline)) void tile_backward(
    int64_t N, Tile T, int64_t batch, int64_t dim, int64_t L, int64_t G, int64_t blk, const float *u,
    const float *delta, const float *A, const float *Bm, const float *Cm, const float *D, const float *z,
    const float *bias, int softplus, const float *ckpt, const float *gout, const float *glast, float *du,
    float *ddelta, float *dz, float *dA, float *dBm, float *dCm, float *dD, float *dbias, float *lams,
    float *work) {
    int64_t nblk = (L + blk - 1) / blk, nd = T.d1 - T.d0;
    float *dAr = lams + CT * N;
    memset(dAr, 0, nd * N * sizeof(float));
    for (int64_t b = 0; b < batch; b++) {
        int64_t off = (b * G + T.g) * L * N;
        for (int64_t d = T.d0; d < T.d1; d++) {
            float *lam = lams + (d - T.d0) * N;
            if (glast) memcpy(lam, glast + (b * dim + d) * N, N * sizeof(float));
            else memset(lam, 0, N * sizeof(float));
        }
        for (int64_t k = nblk - 1; k >= 0; k--) {
            int64_t t0 = k * blk, m = L - t0 < blk ? L - t0 : blk;
            for (int64_t d = T.d0; d < T.d1; d++) {
                int64_t i = b * dim + d;
                block_backward(N, t0, m, u + i * L, delta + i * L, z ? z + i * L : NULL, A + d * N,
                               Bm + off + t0 * N, Cm + off + t0 * N, D ? D[d] : 0.0f, bias ? bias[d] : 0.0f,
                               softplus, ckpt + (i * nblk + k) * N, gout + i * L, lams + (d - T.d0) * N,
                               du + i * L, ddelta + i * L, z ? dz + i * L : NULL, dAr + (d - T.d0) * N,
                               dBm + off + t0 * N, dCm + off + t0 * N, dD + d, dbias + d, work);
            }
        }
    }
    for (int64_t d = T.d0; d < T.d1; d++)
        for (int64_t n = 0; n < N; n++) dA[d * N + n] += dAr[(d - T.d0) * N + n];
}

/* Backward over all rows; threads split the channel tiles (every batch item of a tile in one thread), so dA, dD
 * and dbias rows have one writer each. dB, dC: (nthreads, batch, G, L, N) accumulators, zeroed by the caller,
 * which sums them over threads; dA, dD, dbias zeroed by the caller. */
void scan_bwd(int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t G, int64_t blk, const float *u,
              const float *delta, const float *A, const float *Bm, const float *Cm, const float *D, const float *z,
              const float *bias, int softplus, const float *ckpt, const float *gout, const float *glast, float *du,
              float *ddelta, float *dz, float *dA, float *dB, float *dC, float *dD, float *dbias, int nthreads) {
    int64_t dpg = dim / G, tpg = (dpg + CT - 1) / CT, acc = batch * G * L * N;
#pragma omp parallel num_threads(nthreads)
    {
        float *work = alloc_floats(WORK_FLOATS(N) + BLK_MAX * N + 2 * CT * N);
        float *lams = work + WORK_FLOATS(N) + BLK_MAX * N;
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
        for (int64_t i = 0; i < G * tpg; i++) {
            Tile T = tile_at(i, G, dpg, tpg, 0);
            if (N == 16)
                tile_backward(16, T, batch, dim, L, G, blk, u, delta, A, Bm, Cm, D, z, bias, softplus, ckpt, gout,
                              glast, du, ddelta, dz, dA, dB + tid * acc, dC + tid * acc, dD, dbias, lams, work);
            else if (N == 8)
                tile_backward(8, T, batch, dim, L, G, blk, u, delta, A, Bm, Cm, D, z, bias, softplus, ckpt, gout,
                              glast, du, ddelta, dz, dA, dB + tid * acc, dC + tid * acc, dD, dbias, lams, work);
            else
                tile_backward(N, T, batch, dim, L, G, blk, u, delta, A, Bm, Cm, D, z, bias, softplus, ckpt, gout,
                              glast, du, ddelta, dz, dA, dB + tid * acc, dC + tid * acc, dD, dbias, lams, work);
        }
        free(work);
    }
}
