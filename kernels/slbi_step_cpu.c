/*
 * The fused SLBI step on the CPU: one call updates every tensor of a flat bucket.
 *
 * It reads the same chunk, flag and hyper-parameter tables as the Triton kernel
 * (kernels/slbi_step.py; table layout in kernels/chunk_format.py, passed in as -D
 * defines by kernels/cpu_step.py, which builds this file once per machine and dtype)
 * and implements the same step, DESIGN.md §1, t -> t+1, per element:
 *
 *   u       = g * inv_scale + wd * W
 *   v_{t+1} = u                          first step, or rho = 0
 *           = rho * v_t + (1 - d) * u    otherwise
 *   Gamma_t = kappa * prox(Z_t)          l1:    sign(Z) * max(|Z| - lam, 0)
 *                                        group: Z_g * max(0, 1 - lam / |Z_g|)  (0 if |Z_g| = 0)
 *   W_{t+1} = W_t - lr*kappa * (v_{t+1} + (W_t - Gamma_t) / mu)     penalised
 *   Z_{t+1} = Z_t + (lr / mu) * (W_t - Gamma_t)                     penalised
 *   W_{t+1} = W_t - lr*kappa * v_{t+1}                               penalty "none"
 *
 * |Z_g| of Z_t comes from the group-norm table written by the previous step; a group's
 * row is updated and |Z_{t+1,g}| summed in the same loop, so each of W, Z, g, v is read
 * from memory once and W, Z, v written once, with no second pass over Z. Each chunk
 * owns whole rows: the result does not depend on the number of threads.
 *
 * SLBI_SCALAR is the bucket's dtype (float or double): the arithmetic runs in it, as in
 * the torch backend; coefficients are formed in double from the float64 hyper-parameter
 * table, as Python forms them there.
 */
#include <stdint.h>
#include <tgmath.h> /* fabs, copysign, sqrt in the scalar's own precision */

typedef SLBI_SCALAR scalar_t;

enum { V_NONE = 0, V_FIRST = 1, V_HISTORY = 2 }; /* no buffer; v = u; v = rho*v + (1-d)*u */

typedef struct {
    scalar_t lr_kappa, lr_over_mu, kappa, mu, lam, rho, one_minus_d, wd, scale;
} coefficients;

/* One contiguous span of n elements with one penalty and one momentum mode; for the
 * group penalty `shrink` is the row's max(0, 1 - lam/|Z_g|) and the return value is
 * sum(Z_{t+1}^2) over the span. Inlined with constant penalty and v_mode, so each case
 * is its own vectorised loop. */
static inline __attribute__((always_inline)) scalar_t update_span(
    scalar_t *restrict w, const scalar_t *restrict g, scalar_t *restrict z, scalar_t *restrict v,
    int64_t n, const int penalty, const int v_mode, const coefficients c, scalar_t shrink)
{
    scalar_t sq_sum = 0;
#pragma omp simd reduction(+ : sq_sum)
    for (int64_t i = 0; i < n; ++i) {
        scalar_t w_t = w[i];
        scalar_t u = g[i] * c.scale + c.wd * w_t;
        scalar_t velocity = v_mode == V_HISTORY ? c.rho * v[i] + c.one_minus_d * u : u;
        if (v_mode != V_NONE)
            v[i] = velocity;
        if (penalty == PENALTY_NONE) {
            w[i] = w_t - c.lr_kappa * velocity;
            continue;
        }
        scalar_t z_t = z[i];
        scalar_t gamma;
        if (penalty == PENALTY_GROUP) {
            gamma = c.kappa * z_t * shrink;
        } else {
            scalar_t excess = fabs(z_t) - c.lam;
            gamma = c.kappa * copysign(excess > 0 ? excess : (scalar_t)0, z_t);
        }
        scalar_t residual = w_t - gamma; /* W_t - Gamma_t */
        w[i] = w_t - c.lr_kappa * (velocity + residual / c.mu);
        scalar_t z_next = z_t + c.lr_over_mu * residual;
        z[i] = z_next;
        sq_sum += z_next * z_next;
    }
    return sq_sum;
}

static inline __attribute__((always_inline)) void update_chunk(
    scalar_t *w, const scalar_t *g, scalar_t *z, scalar_t *v, float *norms, const int64_t *chunk,
    const int penalty, const int v_mode, const coefficients c)
{
    const int64_t start = chunk[CHUNK_START], rows = chunk[CHUNK_ROWS];
    const int64_t row_len = chunk[CHUNK_ROW_LEN], end = chunk[CHUNK_END];
    if (penalty != PENALTY_GROUP) {
        /* Rows of l1 / "none" chunks are back to back: one span, cut at the tensor's end. */
        int64_t stop = start + rows * row_len;
        stop = stop < end ? stop : end;
        update_span(w + start, g + start, z + start, v_mode == V_NONE ? 0 : v + start, stop - start,
                    penalty, v_mode, c, 0);
        return;
    }
    float *row_norms = norms + chunk[CHUNK_NORM_OFFSET];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t at = start + r * row_len;
        /* max(0, 1 - lam/|Z_g|) in float32, as the torch backend computes it from the table. */
        const float norm = row_norms[r];
        const float shrink = norm > 0.0f ? fmaxf(1.0f - (float)c.lam / norm, 0.0f) : 0.0f;
        const scalar_t sq_sum =
            update_span(w + at, g + at, z + at, v_mode == V_NONE ? 0 : v + at, row_len, PENALTY_GROUP,
                        v_mode, c, shrink);
        row_norms[r] = (float)sqrt(sq_sum);
    }
}

/* Returns 0 after updating the bucket, or does nothing when *found_inf != 0 (inf/NaN
 * gradients under torch.amp.GradScaler). inv_scale and found_inf may be NULL. */
int slbi_bucket_step(scalar_t *w, const scalar_t *g, scalar_t *z, scalar_t *v, float *norms,
                     const int64_t *chunks, int64_t num_chunks, const int32_t *slot_flags,
                     const double *hparams, const float *inv_scale, const float *found_inf,
                     int num_threads)
{
    if (found_inf != 0 && *found_inf != 0.0f)
        return 0;
    const scalar_t scale = inv_scale != 0 ? (scalar_t)*inv_scale : (scalar_t)1;
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads) if (num_threads > 1)
    for (int64_t k = 0; k < num_chunks; ++k) {
        const int64_t *chunk = chunks + k * CHUNK_FIELDS;
        const int32_t flags = slot_flags[chunk[CHUNK_SLOT]];
        if (!(flags & FLAG_ACTIVE))
            continue;
        const double *hp = hparams + chunk[CHUNK_HPARAM_ROW] * HPARAM_FIELDS;
        const coefficients c = {
            .lr_kappa = (scalar_t)(hp[HP_LR] * hp[HP_KAPPA]),
            .lr_over_mu = (scalar_t)(hp[HP_LR] / hp[HP_MU]),
            .kappa = (scalar_t)hp[HP_KAPPA],
            .mu = (scalar_t)hp[HP_MU],
            .lam = (scalar_t)hp[HP_LAM],
            .rho = (scalar_t)hp[HP_MOMENTUM],
            .one_minus_d = (scalar_t)(1.0 - hp[HP_DAMPENING]),
            .wd = (scalar_t)hp[HP_WEIGHT_DECAY],
            .scale = scale,
        };
        const int v_mode = hp[HP_USE_MOMENTUM] == 0.0 || v == 0 ? V_NONE
                           : (flags & FLAG_MOMENTUM_READY) ? V_HISTORY
                                                           : V_FIRST;
        const int penalty = (int)chunk[CHUNK_PENALTY];
        /* Constant arguments: each (penalty, momentum) case compiles to its own loop. */
#define UPDATE(P)                                                                   \
    switch (v_mode) {                                                               \
    case V_NONE: update_chunk(w, g, z, v, norms, chunk, P, V_NONE, c); break;       \
    case V_FIRST: update_chunk(w, g, z, v, norms, chunk, P, V_FIRST, c); break;     \
    default: update_chunk(w, g, z, v, norms, chunk, P, V_HISTORY, c); break;        \
    }
        switch (penalty) {
        case PENALTY_NONE: UPDATE(PENALTY_NONE); break;
        case PENALTY_L1: UPDATE(PENALTY_L1); break;
        default: UPDATE(PENALTY_GROUP); break;
        }
#undef UPDATE
    }
    return 0;
}
