/*
 * The bfloat16-state update written with AVX2 intrinsics, included by slbi_step_cpu.c in
 * builds with SLBI_STATE_BF16 and SLBI_HAND_AVX2 on a CPU with AVX2 (the v256 variants).
 *
 * The same arithmetic as update_block, operation for operation (W, Z and v are the same
 * bits; a test checks every variant against the torch reference), on 16 elements a turn.
 * Why by hand: the compiler's loop for this build was issue-bound, not memory-bound (AMD
 * EPYC Zen 3, ResNet-50's bucket: 1.38-1.44 x fused SGD; this loop 1.01-1.15 x), and it
 * spent 7 instructions per 16 elements and per state on the NaN test (a compare, masks
 * packed to 16 bits, a byte blend), 2 on masks before packing, and a multiply per vector
 * on the hash's index. Here (docs/design.md, "Where the bfloat16-state step's time goes"):
 *   - lanes "a" hold elements 0-3 and 8-11 of the 16, lanes "b" 4-7 and 12-15: the order in
 *     which unpacking 16 bfloat16 with zeros widens them to float32 (no shift), and in
 *     which packing two rounded vectors stores them (no lane permute);
 *   - the NaN test is one compare and one blend on the 32-bit sum;
 *   - the hash's (index * SR_INDEX_MIX) advances by 16 * SR_INDEX_MIX a turn (the same
 *     product mod 2**32), so the hash costs two multiplies instead of three;
 *   - where the gradient scale, 1 - dampening and kappa are 1.0 (the defaults without a
 *     GradScaler) their products are skipped: x * 1.0 is x.
 * The tail of a span (fewer than 16 elements) is update_block's.
 */
#include <immintrin.h>

_Static_assert(sizeof(scalar_t) == 4 && sizeof(state_t) == 2, "the AVX2 loop is float32 with bfloat16 state");

enum { HAND_LANES = 16 };

/* Elements 0-3 and 8-11 from p, as one vector's lanes (from p + 4: elements 4-7 and 12-15). */
static inline __m256 load_split(const float *p)
{
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(p)), _mm_loadu_ps(p + 8), 1);
}

static inline void store_lanes(float *p, __m256 a, __m256 b)
{
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(a, b, 0x31));
}

/* round_stochastic before the shift: bits + random16, or 0x7FC00000 where x is NaN. */
static inline __m256i rounding_sum(__m256 x, __m256i random16)
{
    const __m256 sum = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(x), random16));
    const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
    return _mm256_castps_si256(_mm256_blendv_ps(sum, quiet_nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

static inline void store_rounded(state_t *p, __m256i a, __m256i b)
{
    _mm256_storeu_si256((__m256i *)p, _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16)));
}

/* sr_hash, given (index_lo * 0x9E3779B1) per lane. */
static inline __m256i hash_lanes(__m256i index_mixed, __m256i key, __m256i step_mix)
{
    __m256i h = _mm256_add_epi32(_mm256_xor_si256(index_mixed, key), step_mix);
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)SR_MIX_1));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)SR_MIX_2));
    return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

typedef struct {
    __m256 w;                /* W_{t+1} */
    __m256i v_sum, z_sum;    /* rounding_sum of v_{t+1} and Z_{t+1} */
    __m256 z_stored;         /* Z_{t+1} as stored (bfloat16, widened) */
} lanes_out;

/* x * factor; with unit (factor known to be 1.0) x itself: the same value, NaN included. */
static inline __m256 times(__m256 x, float factor, const int unit)
{
    return unit ? x : _mm256_mul_ps(x, _mm256_set1_ps(factor));
}

/* update_block's body on 8 lanes; `unit`: the gradient scale, 1 - dampening and kappa are
 * 1.0 (the defaults without a GradScaler), so their products are skipped. */
static inline __attribute__((always_inline)) lanes_out update_lanes(
    __m256 w_t, __m256 g, __m256 v_t, __m256 z_t, __m256i h, const int penalty, const int v_mode,
    const int unit, const coefficients c, float shrink)
{
    lanes_out out = {0};
    const __m256 u = _mm256_add_ps(times(g, c.scale, unit), _mm256_mul_ps(_mm256_set1_ps(c.wd), w_t));
    const __m256 velocity = v_mode == V_HISTORY
        ? _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(c.rho), v_t), times(u, c.one_minus_d, unit))
        : u;
    if (v_mode != V_NONE)
        out.v_sum = rounding_sum(velocity, _mm256_srli_epi32(h, 16));
    if (penalty == PENALTY_NONE) {
        out.w = _mm256_sub_ps(w_t, _mm256_mul_ps(_mm256_set1_ps(c.lr_kappa), velocity));
        return out;
    }
    __m256 gamma;
    if (penalty == PENALTY_GROUP) {
        gamma = _mm256_mul_ps(times(z_t, c.kappa, unit), _mm256_set1_ps(shrink));
    } else { /* kappa * (z < 0 ? -kept : kept), kept = excess <= 0 ? 0 : excess (NaN stays) */
        const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
        const __m256 excess = _mm256_sub_ps(_mm256_andnot_ps(sign, z_t), _mm256_set1_ps(c.lam));
        const __m256 kept = _mm256_and_ps(excess, _mm256_cmp_ps(excess, _mm256_setzero_ps(), _CMP_NLE_UQ));
        const __m256 negative = _mm256_cmp_ps(z_t, _mm256_setzero_ps(), _CMP_LT_OQ);
        gamma = times(_mm256_xor_ps(kept, _mm256_and_ps(sign, negative)), c.kappa, unit);
    }
    const __m256 residual = _mm256_sub_ps(w_t, gamma);
    const __m256 pulled = _mm256_add_ps(velocity, _mm256_mul_ps(residual, _mm256_set1_ps(c.inv_mu)));
    out.w = _mm256_sub_ps(w_t, _mm256_mul_ps(_mm256_set1_ps(c.lr_kappa), pulled));
    out.z_sum = rounding_sum(_mm256_add_ps(z_t, _mm256_mul_ps(_mm256_set1_ps(c.lr_over_mu), residual)),
                             _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF)));
    out.z_stored = _mm256_castsi256_ps(_mm256_and_si256(out.z_sum, _mm256_set1_epi32((int)0xFFFF0000u)));
    return out;
}

/* update_block on the first n - n % 16 elements (its tail is left to update_block). */
static inline __attribute__((always_inline)) scalar_t update_block_avx2(
    scalar_t *restrict w, const scalar_t *restrict g, state_t *restrict z, state_t *restrict v,
    uint32_t key, uint32_t lo, int32_t n, const int penalty, const int v_mode, const int unit,
    const coefficients c, scalar_t shrink)
{
    const __m256i index_mix = _mm256_set1_epi32((int)SR_INDEX_MIX);
    const __m256i advance = _mm256_set1_epi32((int)(HAND_LANES * SR_INDEX_MIX));
    const __m256i keys = _mm256_set1_epi32((int)key), step_mix = _mm256_set1_epi32((int)c.step_mix);
    const __m256i index_lo = _mm256_set1_epi32((int)lo), zero = _mm256_setzero_si256();
    __m256i mixed_a = _mm256_mullo_epi32(_mm256_add_epi32(index_lo, _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11)),
                                         index_mix);
    __m256i mixed_b = _mm256_mullo_epi32(_mm256_add_epi32(index_lo, _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15)),
                                         index_mix);
    __m256 sq_sum = _mm256_setzero_ps();
    for (int32_t i = 0; i + HAND_LANES <= n; i += HAND_LANES) {
        const __m256i h_a = hash_lanes(mixed_a, keys, step_mix), h_b = hash_lanes(mixed_b, keys, step_mix);
        mixed_a = _mm256_add_epi32(mixed_a, advance);
        mixed_b = _mm256_add_epi32(mixed_b, advance);
        __m256 v_a = _mm256_setzero_ps(), v_b = v_a, z_a = v_a, z_b = v_a;
        if (v_mode == V_HISTORY) {
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(v + i));
            v_a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));
            v_b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
        }
        if (penalty != PENALTY_NONE) {
            const __m256i packed = _mm256_loadu_si256((const __m256i *)(z + i));
            z_a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));
            z_b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
        }
        const lanes_out a = update_lanes(load_split(w + i), load_split(g + i), v_a, z_a, h_a, penalty, v_mode,
                                         unit, c, shrink);
        const lanes_out b = update_lanes(load_split(w + i + 4), load_split(g + i + 4), v_b, z_b, h_b, penalty,
                                         v_mode, unit, c, shrink);
        store_lanes(w + i, a.w, b.w);
        if (v_mode != V_NONE)
            store_rounded(v + i, a.v_sum, b.v_sum);
        if (penalty != PENALTY_NONE) {
            store_rounded(z + i, a.z_sum, b.z_sum);
            sq_sum = _mm256_add_ps(sq_sum, _mm256_add_ps(_mm256_mul_ps(a.z_stored, a.z_stored),
                                                         _mm256_mul_ps(b.z_stored, b.z_stored)));
        }
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, sq_sum);
    scalar_t total = 0;
    for (int lane = 0; lane < 8; ++lane)
        total += lanes[lane];
    return total;
}
