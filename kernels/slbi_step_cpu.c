/*
 * The fused SLBI step on the CPU: one call updates every tensor of a flat bucket.
 *
 * The C implementation of the op slbi_triton::bucket_step (kernels/ops.py): it reads the
 * tables of the kernel ABI (kernels/abi.py; the column numbers arrive as -D defines from
 * kernels/cpu_step.py) and implements docs/design.md, "The update", per element:
 *
 *   u       = g * inv_scale + wd * W
 *   v_{t+1} = u                          first step, or rho = 0
 *           = rho * v_t + (1 - d) * u    otherwise
 *   Gamma_t = kappa * prox(Z_t)          l1:    sign(Z) * max(|Z| - lam, 0)
 *                                        group: Z_g * max(0, 1 - lam / |Z_g|)  (0 if |Z_g| = 0)
 *   W_{t+1} = W_t - lr*kappa * (v_{t+1} + (W_t - Gamma_t) * (1/mu))  penalised
 *   Z_{t+1} = Z_t + (lr / mu) * (W_t - Gamma_t)                     penalised
 *   W_{t+1} = W_t - lr*kappa * v_{t+1}                               penalty "none"
 *
 * |Z_g| of Z_t comes from the group-norm table written by the previous step; a group's
 * row is updated and |Z_{t+1,g}| summed in the same loop, so each of W, Z, g, v is read
 * once and W, Z, v written once. Each chunk owns whole rows: the result does not depend
 * on the number of threads.
 *
 * Coupled groups (docs/design.md, "Coupled channel groups"): with a norm_index table, a
 * row shrinks by the norm group_norms[norm_index[r]] (its own, or its coupled group's);
 * the step still writes each row's own norm, and after the parallel loop a serial pass
 * writes each coupled norm s_G * sqrt(sum of its members' own norms squared), summed in
 * member order so that every implementation gets the same bits.
 *
 * Variants (chosen per machine by kernels/cpu_tune.py, which times them; every variant
 * writes the same W, Z and v): in buckets of at least prefetch_min_numel elements (an
 * argument, cpu_step.PREFETCH_MIN_NUMEL: smaller ones stay in the caches), a build with
 * SLBI_PREFETCH_BYTES > 0 walks each span in tiles of SLBI_TILE_BYTES bytes of W and,
 * before a tile, prefetches the lines of W, g, Z and v SLBI_PREFETCH_BYTES bytes of W
 * further on; the vector width is a compiler flag (-mprefer-vector-width); and a build with
 * SLBI_HAND_AVX2 (the v256 variants) runs the bfloat16-state loop written by hand with AVX2
 * intrinsics (slbi_step_cpu_avx2.h), where the compiler's loop was issue-bound. What wins
 * depends on the CPU: on one Intel Xeon the bfloat16-state step was 10-14 % faster with
 * 4 KiB prefetched ahead in 512-byte tiles, on AMD EPYC (Zen 3, Zen 4) 5-50 % slower.
 * The tiles change the order of a group norm's sum, nothing else.
 *
 * Build parameters:
 *   SLBI_SCALAR      the bucket's dtype (float or double); the arithmetic runs in it and
 *                    the group norms are stored in it.
 *   SLBI_STATE_BF16  1: Z and v are stored as bfloat16 (uint16_t bits) and written back
 *                    with stochastic rounding ("Stochastic rounding" in docs/design.md),
 *                    the random bits a hash of (seed, step, element index).
 *   SLBI_HAND_AVX2   1: the bfloat16-state loop of slbi_step_cpu_avx2.h, where the CPU has AVX2.
 *   SLBI_PREFETCH_BYTES, SLBI_TILE_BYTES  the prefetch distance (0: no software prefetch)
 *                    and the tile, in bytes of W (defaults 4096 and 512).
 * Built with -fno-trapping-math: without it GCC leaves the group-penalty loop of the
 * bfloat16 build scalar on CPUs without AVX-512 (it will not speculate the norm's square
 * past the NaN test of the rounding): a 3.6 x slower ResNet-18 step on Zen 3. Results are
 * unchanged: the kernel neither reads nor raises floating-point exceptions.
 */
#include <stdint.h>
#include <string.h>
#include <tgmath.h> /* fabs, fmax, sqrt in the scalar's own precision */

typedef SLBI_SCALAR scalar_t;

#if SLBI_STATE_BF16
typedef uint16_t state_t;
#else
typedef scalar_t state_t;
#endif

enum { V_NONE = 0, V_FIRST = 1, V_HISTORY = 2 }; /* no buffer; v = u; v = rho*v + (1-d)*u */

typedef struct {
    scalar_t lr_kappa, lr_over_mu, kappa, inv_mu, lam, rho, one_minus_d, wd, scale;
    uint32_t seed, step_mix; /* step_mix = step * 0xC2B2AE3D */
    int prefetch;            /* tiles and software prefetch: see slbi_bucket_step */
    int unit;                /* scale, one_minus_d and kappa are 1: x * 1 is x (the AVX2 loop skips them) */
} coefficients;

#ifndef SLBI_TILE_BYTES
#define SLBI_TILE_BYTES 512
#endif
#ifndef SLBI_PREFETCH_BYTES
#define SLBI_PREFETCH_BYTES 4096
#endif

enum {
    TILE = SLBI_TILE_BYTES / (int)sizeof(scalar_t),               /* elements per prefetched tile */
    PREFETCH_AHEAD = SLBI_PREFETCH_BYTES / (int)sizeof(scalar_t), /* how far ahead, in elements */
    MAX_BLOCK = 1 << 30, /* an int32 loop's length, without prefetch */
};

/* The counter-based hash of docs/design.md: 32 random bits per (seed, step, index), split
 * as its loops use it: `key` = seed ^ hi32(index) * 0x85EBCA77 is the same for a whole
 * span (spans never cross a multiple of 2**32, see update_range), lo32(index) varies. */
#define SR_INDEX_MIX 0x9E3779B1u /* the hash's constants (docs/design.md), shared with the AVX2 loop */
#define SR_MIX_1 0x85EBCA6Bu
#define SR_MIX_2 0xC2B2AE35u

static inline uint32_t sr_hash(uint32_t key, uint32_t step_mix, uint32_t index_lo)
{
    uint32_t h = ((index_lo * SR_INDEX_MIX) ^ key) + step_mix;
    h ^= h >> 16;
    h *= SR_MIX_1;
    h ^= h >> 13;
    h *= SR_MIX_2;
    h ^= h >> 16;
    return h;
}

static inline uint32_t span_key(uint32_t seed, int64_t first)
{
    return seed ^ ((uint32_t)((uint64_t)first >> 32) * 0x85EBCA77u);
}

#if SLBI_STATE_BF16
static inline float widen(state_t bits)
{
    const uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline float load_state(const state_t *p, int64_t i) { return widen(p[i]); }

/* float -> bfloat16, rounded up in magnitude with probability (dropped bits) / 2**16:
 * unbiased. Inf + random16 stays inf; NaN becomes the quiet NaN (its payload is not kept). */
static inline state_t round_stochastic(float value, uint32_t random16)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const state_t rounded = (state_t)((bits + random16) >> 16);
    return value != value ? (state_t)0x7FC0u : rounded;
}

/* Z takes the low 16 random bits, v the high ones; store_z returns the value stored. */
static inline float store_z(state_t *p, int64_t i, float value, uint32_t h)
{
    const state_t rounded = round_stochastic(value, h & 0xFFFFu);
    p[i] = rounded;
    return widen(rounded);
}
static inline void store_v(state_t *p, int64_t i, float value, uint32_t h) { p[i] = round_stochastic(value, h >> 16); }
#define HASH(c, key, lo, i) sr_hash((key), (c).step_mix, (lo) + (uint32_t)(i))
#else
static inline scalar_t load_state(const state_t *p, int64_t i) { return p[i]; }
static inline scalar_t store_z(state_t *p, int64_t i, scalar_t value, uint32_t h)
{
    (void)h;
    p[i] = value;
    return value;
}
static inline void store_v(state_t *p, int64_t i, scalar_t value, uint32_t h)
{
    (void)h;
    p[i] = value;
}
#define HASH(c, key, lo, i) 0u
#endif

/* n < 2**31 contiguous elements whose flat indices have high word `key` (span_key) and
 * low words lo, lo + 1, ...: one penalty and one momentum mode; for the group penalty
 * `shrink` is the row's max(0, 1 - lam/|Z_g|) and the return value is sum(Z_{t+1}^2) of
 * the stored values. Inlined with constant penalty and v_mode, so each case is its own
 * vectorised loop; the 32-bit counter keeps the hash's index arithmetic 32-bit. */
static inline __attribute__((always_inline)) scalar_t update_block(
    scalar_t *restrict w, const scalar_t *restrict g, state_t *restrict z, state_t *restrict v,
    uint32_t key, uint32_t lo, int32_t n, const int penalty, const int v_mode, const coefficients c,
    scalar_t shrink)
{
    scalar_t sq_sum = 0;
    (void)key, (void)lo;
#pragma omp simd reduction(+ : sq_sum)
    for (int32_t i = 0; i < n; ++i) {
        const uint32_t h = HASH(c, key, lo, i);
        (void)h;
        scalar_t w_t = w[i];
        scalar_t u = g[i] * c.scale + c.wd * w_t;
        scalar_t velocity = v_mode == V_HISTORY ? c.rho * load_state(v, i) + c.one_minus_d * u : u;
        if (v_mode != V_NONE)
            store_v(v, i, velocity, h);
        if (penalty == PENALTY_NONE) {
            w[i] = w_t - c.lr_kappa * velocity;
            continue;
        }
        scalar_t z_t = load_state(z, i);
        scalar_t gamma;
        if (penalty == PENALTY_GROUP) {
            gamma = c.kappa * z_t * shrink;
        } else {
            /* sign(Z) * max(|Z| - lam, 0) as the reference computes it: NaN when Z is, and
             * +0 for Z = -0 (torch.sign(-0.) is +0) */
            const scalar_t excess = fabs(z_t) - c.lam;
            const scalar_t kept = excess <= 0 ? (scalar_t)0 : excess;
            gamma = c.kappa * (z_t < 0 ? -kept : kept);
        }
        scalar_t residual = w_t - gamma; /* W_t - Gamma_t */
        w[i] = w_t - c.lr_kappa * (velocity + residual * c.inv_mu);
        const scalar_t z_stored = store_z(z, i, z_t + c.lr_over_mu * residual, h);
        sq_sum += z_stored * z_stored;
    }
    return sq_sum;
}

#if SLBI_STATE_BF16 && SLBI_HAND_AVX2 && defined(__AVX2__)
#define HAND_AVX2 1
#include "slbi_step_cpu_avx2.h" /* update_block_avx2: update_block's first n - n % 16 elements */
#else
#define HAND_AVX2 0
#endif

/* Prefetch the cache lines of `bytes` bytes from `offset` bytes past `base`. The address is
 * computed as an integer: it may lie past the buffer's end, where a prefetch is a no-op. */
static inline void prefetch_lines(const void *base, int64_t offset, int64_t bytes, const int for_write)
{
    const uintptr_t start = (uintptr_t)base + (uintptr_t)offset;
    for (int64_t at = 0; at < bytes; at += 64) {
        if (for_write)
            __builtin_prefetch((const void *)(start + (uintptr_t)at), 1);
        else
            __builtin_prefetch((const void *)(start + (uintptr_t)at), 0);
    }
}

/* update_block over a span of n elements from flat index `first` (the high word of the
 * index the same throughout, see update_range): in tiles, each after a prefetch of the
 * lines PREFETCH_AHEAD elements on, when c.prefetch; else in blocks of MAX_BLOCK. */
static inline __attribute__((always_inline)) scalar_t update_span(
    scalar_t *w, const scalar_t *g, state_t *z, state_t *v, int64_t first, int64_t n, const int penalty,
    const int v_mode, const coefficients c, scalar_t shrink)
{
    const uint32_t key = span_key(c.seed, first);
    const int64_t step = c.prefetch ? TILE : MAX_BLOCK;
    scalar_t sq_sum = 0;
    for (int64_t at = 0; at < n; at += step) {
        const int32_t len = (int32_t)(n - at < step ? n - at : step);
        if (c.prefetch) {
            const int64_t ahead = at + PREFETCH_AHEAD;
            prefetch_lines(w, ahead * (int64_t)sizeof *w, len * (int64_t)sizeof *w, 1);
            prefetch_lines(g, ahead * (int64_t)sizeof *g, len * (int64_t)sizeof *g, 0);
            if (penalty != PENALTY_NONE)
                prefetch_lines(z, ahead * (int64_t)sizeof *z, len * (int64_t)sizeof *z, 1);
            if (v_mode == V_HISTORY)
                prefetch_lines(v, ahead * (int64_t)sizeof *v, len * (int64_t)sizeof *v, 1);
        }
        int32_t done = 0;
#if HAND_AVX2
        done = len - len % HAND_LANES;
        if (c.unit) /* constant in each call: two loops */
            sq_sum += update_block_avx2(w + at, g + at, z + at, v_mode == V_NONE ? 0 : v + at, key,
                                        (uint32_t)(first + at), done, penalty, v_mode, 1, c, shrink);
        else
            sq_sum += update_block_avx2(w + at, g + at, z + at, v_mode == V_NONE ? 0 : v + at, key,
                                        (uint32_t)(first + at), done, penalty, v_mode, 0, c, shrink);
#endif
        const int64_t from = at + done;
        sq_sum += update_block(w + from, g + from, z + from, v_mode == V_NONE ? 0 : v + from, key,
                               (uint32_t)(first + from), len - done, penalty, v_mode, c, shrink);
    }
    return sq_sum;
}

/* update_span over [first, first + n), cut where the flat index crosses a multiple of
 * 2**32 (the hash's high bits change there; only buckets past 16 GiB have one). One call
 * site of update_span in a loop, not one per piece: each inlined copy of the loops costs
 * compile time, and the autotune compiles several variants. */
static inline __attribute__((always_inline)) scalar_t update_range(
    scalar_t *w, const scalar_t *g, state_t *z, state_t *v, int64_t first, int64_t n, const int penalty,
    const int v_mode, const coefficients c, scalar_t shrink)
{
    scalar_t sq_sum = 0;
    while (n > 0) {
        const int64_t room = SLBI_STATE_BF16 ? (int64_t)((((uint64_t)first >> 32) + 1) << 32) - first : n;
        const int64_t len = n < room ? n : room;
        sq_sum += update_span(w, g, z, v_mode == V_NONE ? 0 : v, first, len, penalty, v_mode, c, shrink);
        w += len, g += len, z += len, first += len, n -= len;
        if (v_mode != V_NONE)
            v += len;
    }
    return sq_sum;
}

typedef struct {
    int64_t start, rows, row_len, end, norm_offset;
    const void *norm_index; /* NULL: each row shrinks by its own norm */
    int wide_index;         /* the index tables are int64 (else int32) */
} chunk_t;

static inline int64_t entry(const void *table, int wide, int64_t i)
{
    return wide ? ((const int64_t *)table)[i] : ((const int32_t *)table)[i];
}

static inline __attribute__((always_inline)) void update_chunk(
    scalar_t *w, const scalar_t *g, state_t *z, state_t *v, scalar_t *norms, const chunk_t k,
    const int penalty, const int v_mode, const coefficients c)
{
    state_t *v_at = v_mode == V_NONE ? 0 : v + k.start;
    if (penalty != PENALTY_GROUP) {
        /* Rows of l1 / "none" chunks are back to back: one span, cut at the tensor's end. */
        int64_t stop = k.start + k.rows * k.row_len;
        stop = stop < k.end ? stop : k.end;
        update_range(w + k.start, g + k.start, z + k.start, v_at, k.start, stop - k.start, penalty,
                     v_mode, c, 0);
        return;
    }
    scalar_t *row_norms = norms + k.norm_offset;
    for (int64_t r = 0; r < k.rows; ++r) {
        const int64_t at = k.start + r * k.row_len;
        const scalar_t norm = k.norm_index ? norms[entry(k.norm_index, k.wide_index, k.norm_offset + r)]
                                           : row_norms[r];
        const scalar_t shrink = norm > 0 ? fmax(1 - c.lam / norm, (scalar_t)0) : 0;
        const scalar_t sq_sum = update_range(w + at, g + at, z + at, v_mode == V_NONE ? 0 : v + at, at,
                                             k.row_len, PENALTY_GROUP, v_mode, c, shrink);
        row_norms[r] = sqrt(sq_sum);
    }
}

static inline int64_t field(const void *chunks, int wide, int64_t k, int f)
{
    return entry(chunks, wide, k * CHUNK_FIELDS + f);
}

/* The first chunk that reaches outside the buffers or tables, or -1: checked before the
 * step writes anything (static: the step calls it). An l1/"none" chunk's rows may run past its tensor (the span is
 * cut at CHUNK_END); a group chunk's rows may not, nor its norms past the num_rows own ones. */
static int64_t slbi_check_chunks(const void *chunks, int wide, int64_t num_chunks, int64_t numel,
                          int64_t num_slots, int64_t num_groups, int64_t num_rows)
{
    for (int64_t k = 0; k < num_chunks; ++k) {
        const int64_t start = field(chunks, wide, k, CHUNK_START), rows = field(chunks, wide, k, CHUNK_ROWS);
        const int64_t row_len = field(chunks, wide, k, CHUNK_ROW_LEN), end = field(chunks, wide, k, CHUNK_END);
        const int64_t slot = field(chunks, wide, k, CHUNK_SLOT), row = field(chunks, wide, k, CHUNK_HPARAM_ROW);
        const int64_t penalty = field(chunks, wide, k, CHUNK_PENALTY);
        const int64_t norm = field(chunks, wide, k, CHUNK_NORM_OFFSET);
        int ok = start >= 0 && start <= numel && end >= 0 && end <= numel && rows >= 0 && rows < (1LL << 31)
                 && row_len >= 0 && row_len < (1LL << 31) && slot >= 0 && slot < num_slots && row >= 0
                 && row < num_groups && penalty >= PENALTY_NONE && penalty <= PENALTY_GROUP;
        if (ok && penalty == PENALTY_GROUP)
            ok = start + rows * row_len <= numel && norm >= 0 && norm + rows <= num_rows;
        if (!ok)
            return k;
    }
    return -1;
}

/* Whether the coupled tables stay inside group_norms and the member list, checked before
 * the step writes anything: a row reads its own norm or a coupled one (never another
 * row's, which another thread writes), the offsets run from 0 to num_members without
 * going back, every member is a row. Without tables (NULL) there are no coupled norms. */
static int slbi_check_coupling(const void *norm_index, const void *offsets, const void *rows, const void *scale,
                               int wide, int64_t num_rows, int64_t num_coupled, int64_t num_members)
{
    if (!norm_index || !offsets || !rows || !scale)
        return !norm_index && !offsets && !rows && !scale && num_coupled == 0;
    if (num_rows < 0 || num_coupled < 0 || entry(offsets, wide, 0) != 0
        || entry(offsets, wide, num_coupled) != num_members)
        return 0;
    for (int64_t r = 0; r < num_rows; ++r) {
        const int64_t at = entry(norm_index, wide, r);
        if (at != r && (at < num_rows || at >= num_rows + num_coupled))
            return 0;
    }
    for (int64_t c = 0; c < num_coupled; ++c)
        if (entry(offsets, wide, c + 1) < entry(offsets, wide, c))
            return 0;
    for (int64_t m = 0; m < num_members; ++m) {
        const int64_t row = entry(rows, wide, m);
        if (row < 0 || row >= num_rows)
            return 0;
    }
    return 1;
}

/* Updates the bucket and counts the step (rng[RNG_STEP] += 1), or does nothing when
 * *found_inf != 0 (inf/NaN gradients under torch.amp.GradScaler). The arguments are those
 * of the op (kernels/abi.py, BucketArgs, in order: a test checks this prototype against
 * it), then the sizes the launcher reads off them (kernels/cpu_step.py, SIZE_ARGS).
 * inv_scale, found_inf and the four coupled tables may be NULL; chunks and the index
 * tables are int64 when wide_index, else int32; buckets of at least prefetch_min_numel
 * elements take the tiled, prefetching walk where the build has one (SLBI_PREFETCH_BYTES > 0).
 * Returns -1; or, having written nothing, the
 * index of the first chunk that reaches outside the buffers, SLBI_BAD_COUPLING when a
 * coupled table does, SLBI_BAD_BUILD when stochastic_rounding is not this build's. */
enum { SLBI_BAD_COUPLING = -2, SLBI_BAD_BUILD = -3 };

int64_t slbi_bucket_step(scalar_t *params, const scalar_t *grads, state_t *z, state_t *momentum,
                         scalar_t *group_norms, const void *chunks, const int32_t *slot_flags,
                         const double *hparams, int64_t *rng, const float *inv_scale, const float *found_inf,
                         const void *norm_index, const void *coupled_offsets, const void *coupled_rows,
                         const scalar_t *coupled_scale, int stochastic_rounding, int wide_index,
                         int64_t num_chunks, int64_t numel, int64_t num_slots, int64_t num_groups,
                         int64_t num_norms, int64_t num_coupled, int64_t num_members,
                         int64_t prefetch_min_numel, int num_threads)
{
    if (stochastic_rounding != SLBI_STATE_BF16)
        return SLBI_BAD_BUILD;
    const int64_t num_rows = num_norms - num_coupled;
    const int64_t bad = slbi_check_chunks(chunks, wide_index, num_chunks, numel, num_slots, num_groups,
                                          num_rows);
    if (bad >= 0)
        return bad;
    if (!slbi_check_coupling(norm_index, coupled_offsets, coupled_rows, coupled_scale, wide_index, num_rows,
                             num_coupled, num_members))
        return SLBI_BAD_COUPLING;
    if (found_inf != 0 && *found_inf != 0.0f)
        return -1;
    const scalar_t scale = inv_scale != 0 ? (scalar_t)*inv_scale : (scalar_t)1;
    const uint32_t seed = (uint32_t)rng[RNG_SEED], step_mix = (uint32_t)rng[RNG_STEP] * 0xC2B2AE3Du;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads) if (num_threads > 1)
    for (int64_t k = 0; k < num_chunks; ++k) {
        const int32_t flags = slot_flags[field(chunks, wide_index, k, CHUNK_SLOT)];
        if (!(flags & FLAG_ACTIVE))
            continue;
        const chunk_t chunk = {
            .start = field(chunks, wide_index, k, CHUNK_START),
            .rows = field(chunks, wide_index, k, CHUNK_ROWS),
            .row_len = field(chunks, wide_index, k, CHUNK_ROW_LEN),
            .end = field(chunks, wide_index, k, CHUNK_END),
            .norm_offset = field(chunks, wide_index, k, CHUNK_NORM_OFFSET),
            .norm_index = norm_index,
            .wide_index = wide_index,
        };
        const double *hp = hparams + field(chunks, wide_index, k, CHUNK_HPARAM_ROW) * HPARAM_FIELDS;
        coefficients c = {
            .lr_kappa = (scalar_t)(hp[HP_LR] * hp[HP_KAPPA]),
            .lr_over_mu = (scalar_t)(hp[HP_LR] / hp[HP_MU]),
            .kappa = (scalar_t)hp[HP_KAPPA],
            .inv_mu = (scalar_t)(1.0 / hp[HP_MU]), /* a product per element, not a division */
            .lam = (scalar_t)hp[HP_LAM],
            .rho = (scalar_t)hp[HP_MOMENTUM],
            .one_minus_d = (scalar_t)(1.0 - hp[HP_DAMPENING]),
            .wd = (scalar_t)hp[HP_WEIGHT_DECAY],
            .scale = scale,
            .seed = seed,
            .step_mix = step_mix,
            .prefetch = SLBI_PREFETCH_BYTES > 0 && numel >= prefetch_min_numel,
        };
        c.unit = c.scale == 1 && c.one_minus_d == 1 && c.kappa == 1;
        const int v_mode = hp[HP_USE_MOMENTUM] == 0.0 || momentum == 0 ? V_NONE
                           : (flags & FLAG_MOMENTUM_READY) ? V_HISTORY
                                                           : V_FIRST;
        const int penalty = (int)field(chunks, wide_index, k, CHUNK_PENALTY);
        /* Constant arguments: each (penalty, momentum) case compiles to its own loop. */
#define UPDATE(P)                                                                                     \
    switch (v_mode) {                                                                                 \
    case V_NONE: update_chunk(params, grads, z, momentum, group_norms, chunk, P, V_NONE, c); break;   \
    case V_FIRST: update_chunk(params, grads, z, momentum, group_norms, chunk, P, V_FIRST, c); break; \
    default: update_chunk(params, grads, z, momentum, group_norms, chunk, P, V_HISTORY, c); break;    \
    }
        switch (penalty) {
        case PENALTY_NONE: UPDATE(PENALTY_NONE); break;
        case PENALTY_L1: UPDATE(PENALTY_L1); break;
        default: UPDATE(PENALTY_GROUP); break;
        }
#undef UPDATE
    }
    /* Every own norm is written: the coupled ones, in member order (one sum, one order). */
    for (int64_t group = 0; group < num_coupled; ++group) {
        const int64_t first = entry(coupled_offsets, wide_index, group);
        const int64_t stop = entry(coupled_offsets, wide_index, group + 1);
        scalar_t sq_sum = 0;
        for (int64_t m = first; m < stop; ++m) {
            const scalar_t norm = group_norms[entry(coupled_rows, wide_index, m)];
            sq_sum += norm * norm;
        }
        group_norms[num_rows + group] = coupled_scale[group] * sqrt(sq_sum);
    }
    rng[RNG_STEP] += 1;
    return -1;
}
