/* The NB / ZINB negative log-likelihood of CSR count rows, per row, with its local derivatives.
 *
 * Per row: one vectorised pass treats every entry as a zero count (the loops call glibc's vector
 * exp / log / log1p, libmvec, where the build found it), then the row's stored counts are
 * gathered, their counted version computed in whole vectors, and written over their entries.
 * Small integer counts need no lgamma or digamma: lgamma(x + theta) - lgamma(theta) is the log of
 * a product and digamma(x + theta) - digamma(theta) a sum of reciprocals. Rows are independent,
 * so the result does not depend on how rows are split over threads. Formulas, notation and eps as
 * the notation block of scvi_cli/nn/likelihoods.py: te = theta + EPS, u = mu / te, l1 = log1p(u),
 * q = 1 / (1 + u), b = pi + theta * l1; every function returns or writes the NLL's terms.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef USE_LIBMVEC   /* the vector variants of libmvec, without -ffast-math's other licences */
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float log1pf(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
double log(double);
#endif

#define EPS 1e-8f
#define SMALL_COUNT 16           /* counts up to this: a product and a sum instead of lgamma / digamma */
#define LOG_FACTORIAL_SIZE 1024
#define CHUNK 256                /* stored counts gathered per vector pass */

static double log_factorial[LOG_FACTORIAL_SIZE];   /* log(k!) */
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;
static void fill_tables(void)
{
    log_factorial[0] = 0.0;
    for (int k = 1; k < LOG_FACTORIAL_SIZE; k++) log_factorial[k] = log_factorial[k - 1] + log((double)k);
}

/* digamma(y), y > 0: the recurrence up to y >= 6, then the asymptotic series (remainder ~1e-12) */
static double digamma(double y)
{
    if (!(y > 0.0) || isinf(y)) return y == INFINITY ? INFINITY : NAN;   /* and the loop below ends */
    double shift = 0.0;
    while (y < 6.0) { shift += 1.0 / y; y += 1.0; }
    double inv = 1.0 / y, inv2 = inv * inv;
    double series = inv2 * (1.0 / 12 - inv2 * (1.0 / 120 - inv2 * (1.0 / 252 - inv2 * (1.0 / 240 - inv2 * (1.0 / 132 - inv2 * (691.0 / 32760))))));
    return log(y) - 0.5 * inv - series - shift;
}

/* lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) as log(*product) + *rest (the log taken by the
 * caller, vectorised), and digamma(theta) - digamma(x + theta); NaN for a negative count */
static void gamma_parts(double x, double theta, double *product, double *rest, double *d_theta)
{
    if (!(x > 0.0)) { *product = 1.0; *rest = NAN; *d_theta = NAN; return; }
    /* small integer counts: the product of x factors stays finite up to theta ~ 1e19 */
    if (x <= SMALL_COUNT && x == floor(x) && theta < 1e18) {
        int n = (int)x;
        double p = 1.0, r = 0.0;
        for (int k = 0; k < n; k++) { p *= theta + k; r += 1.0 / (theta + k); }
        *product = p; *rest = -log_factorial[n]; *d_theta = -r;
        return;
    }
    int sign;
    double lg_x1 = (x < LOG_FACTORIAL_SIZE && x == floor(x)) ? log_factorial[(int)x] : lgamma_r(x + 1.0, &sign);
    *product = 1.0;
    *rest = lgamma_r(x + theta, &sign) - lgamma_r(theta, &sign) - lg_x1;
    *d_theta = digamma(theta) - digamma(x + theta);
}

/* lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) and its theta derivative (for the tests) */
void nb_gamma_terms(double x, double theta, double *value, double *d_theta)
{
    pthread_once(&tables_once, fill_tables);
    double product, rest;
    gamma_parts(x, theta, &product, &rest, d_theta);
    *value = log(product) + rest;
}

typedef struct {
    int64_t n_genes;
    int loc_is_log;
    const float *loc, *theta, *pi;
    int64_t theta_stride, pi_stride;   /* 0: one (G,) row for every row; n_genes: one per row */
    const int64_t *indptr, *indices;
    const float *values;
    float *nll, *d_loc, *d_theta, *d_pi;
} Work;

/* exp(-|t|), its argument clamped at 80: exp(-80) = 1.8e-35 is still a normal float, and past about
 * -87 libmvec's vector exp falls back to scalar code for the whole vector (all that is used of the
 * value, 1 + exp(-|t|) and the sigmoids, is the same to float precision) */
#pragma omp declare simd notinbranch
static inline float exp_neg_abs(float t)
{
    float a = fabsf(t);
    return expf(-(a < 80.f ? a : 80.f));
}

/* sigmoid(t) from e = exp(-|t|): 1 / (1 + e) for t >= 0, e / (1 + e) below */
#pragma omp declare simd notinbranch
static inline float sigmoid_from(float t, float e)
{
    float r = 1.f / (1.f + e);
    return t >= 0.f ? r : e * r;
}

static inline float relu(float t) { return t > 0.f ? t : 0.f; }

/* every entry of one row as a zero count; returns the row's sum of log p */
static inline float dense_row(const int LOG, const int ZINB, int64_t G, const float *restrict loc,
                              const float *restrict th, const float *restrict pi, float *restrict d_loc,
                              float *restrict d_theta, float *restrict d_pi)
{
    float acc = 0.f;
    #pragma omp simd reduction(+:acc)
    for (int64_t g = 0; g < G; g++) {
        float t = th[g], it = 1.f / (t + EPS);
        float u = (LOG ? expf(loc[g]) : loc[g]) * it;
        float l1 = log1pf(u), q = 1.f / (1.f + u);
        float keep = 1.f;
        if (ZINB) {
            float p = pi[g], b = p + t * l1;
            float e_p = exp_neg_abs(p), e_b = exp_neg_abs(b);
            keep = sigmoid_from(-b, e_b);   /* 1 - sigmoid(b), without the cancellation */
            /* softplus(b) - softplus(p) = max(b, 0) - max(p, 0) + log((1 + e_b) / (1 + e_p)), the ratio in [1/2, 2] */
            acc += relu(b) - relu(p) + logf((1.f + e_b) * (1.f / (1.f + e_p)));
            d_pi[g] = sigmoid_from(p, e_p) - sigmoid_from(b, e_b);
        }
        acc -= t * l1;
        d_loc[g] = LOG ? keep * t * u * q : keep * t * it * q;
        d_theta[g] = keep * (l1 - t * it * u * q);
    }
    return acc;
}

/* the counted version of m gathered entries (x > 0): their log p terms summed, derivatives in o_* */
static double counted_chunk(const int LOG, const int ZINB, int64_t m, float *c_x, float *c_loc, float *c_t, float *c_p,
                            float *o_loc, float *o_t, float *o_p)
{
    double prod[CHUNK], rest[CHUNK], dg[CHUNK];
    float o_ll[CHUNK];
    for (int64_t k = 0; k < m; k++) gamma_parts(c_x[k], c_t[k], &prod[k], &rest[k], &dg[k]);
    int64_t padded = (m + 7) & ~(int64_t)7;   /* whole vectors: no scalar remainder */
    for (int64_t k = m; k < padded; k++) { c_x[k] = 1.f; c_loc[k] = LOG ? 0.f : 1.f; c_t[k] = 1.f; c_p[k] = 0.f; prod[k] = 1.0; rest[k] = 0.0; }
    #pragma omp simd
    for (int64_t k = 0; k < padded; k++) {
        float x = c_x[k], t = c_t[k], te = t + EPS, it = 1.f / te;
        float mu = LOG ? expf(c_loc[k]) : c_loc[k];
        float u = mu * it, l1 = log1pf(u), q = 1.f / (1.f + u);
        float log_mu = LOG ? c_loc[k] : logf(c_loc[k] + EPS);
        float ll = x * (log_mu - logf(te) - l1);
        float sig_p = 0.f;
        if (ZINB) {   /* the zero-count entry held softplus(b); d pi is sigmoid(pi) here */
            float p = c_p[k], b = p + t * l1;
            sig_p = sigmoid_from(p, exp_neg_abs(p));
            ll -= relu(b) + log1pf(exp_neg_abs(b));
        }
        o_ll[k] = ll;
        o_loc[k] = LOG ? t * u * q - x * q : t * it * q - x * (1.f / (c_loc[k] + EPS) - q * it);
        o_t[k] = (l1 - t * it * u * q) + x * q * it;
        o_p[k] = sig_p;
    }
    double total = 0.0;
    #pragma omp simd reduction(+:total)
    for (int64_t k = 0; k < padded; k++) total += log(prod[k]) + rest[k];
    for (int64_t k = 0; k < m; k++) { total += o_ll[k]; o_t[k] += (float)dg[k]; }
    return total;
}

/* the stored counts of one row (n entries from cols / xs; stored zeros are zero counts): their
 * entries replaced by the counted version; returns the change of the row's log p */
static double counted_entries(const int LOG, const int ZINB, int64_t n, const int64_t *cols, const float *xs,
                              const float *loc, const float *th, const float *pi,
                              float *d_loc, float *d_theta, float *d_pi)
{
    float c_x[CHUNK], c_loc[CHUNK], c_t[CHUNK], c_p[CHUNK], o_loc[CHUNK], o_t[CHUNK], o_p[CHUNK];
    int64_t c_g[CHUNK];
    double total = 0.0;
    int64_t j = 0;
    while (j < n) {
        int64_t m = 0;
        for (; j < n && m < CHUNK; j++) {
            if (xs[j] == 0.f) continue;
            int64_t g = cols[j];
            c_g[m] = g; c_x[m] = xs[j]; c_loc[m] = loc[g]; c_t[m] = th[g]; c_p[m] = ZINB ? pi[g] : 0.f;
            m++;
        }
        total += counted_chunk(LOG, ZINB, m, c_x, c_loc, c_t, c_p, o_loc, o_t, o_p);
        for (int64_t k = 0; k < m; k++) {
            int64_t g = c_g[k];
            d_loc[g] = o_loc[k];
            d_theta[g] = o_t[k];
            if (ZINB) d_pi[g] = o_p[k];
        }
    }
    return total;
}

/* a row's log p (derivatives written), for constant LOG / ZINB: each call site below is specialised */
static inline __attribute__((always_inline)) double row_log_p(const int LOG, const int ZINB, int64_t G, const float *loc,
                                                                 const float *th, const float *pi, int64_t n,
                                                                 const int64_t *cols, const float *xs, float *d_loc,
                                                                 float *d_theta, float *d_pi)
{
    double zeros = dense_row(LOG, ZINB, G, loc, th, pi, d_loc, d_theta, d_pi);
    return zeros + counted_entries(LOG, ZINB, n, cols, xs, loc, th, pi, d_loc, d_theta, d_pi);
}

static void row(const Work *w, int64_t r)
{
    const int64_t G = w->n_genes;
    const int zinb = w->pi != NULL;
    const float *loc = w->loc + r * G, *th = w->theta + r * w->theta_stride;
    const float *pi = zinb ? w->pi + r * w->pi_stride : NULL;
    float *d_loc = w->d_loc + r * G, *d_theta = w->d_theta + r * G, *d_pi = zinb ? w->d_pi + r * G : NULL;
    const int64_t begin = w->indptr[r], n = w->indptr[r + 1] - begin;
    const int64_t *cols = w->indices + begin;
    const float *xs = w->values + begin;
    double log_p;
    if (w->loc_is_log)
        log_p = zinb ? row_log_p(1, 1, G, loc, th, pi, n, cols, xs, d_loc, d_theta, d_pi)
                     : row_log_p(1, 0, G, loc, th, pi, n, cols, xs, d_loc, d_theta, d_pi);
    else
        log_p = zinb ? row_log_p(0, 1, G, loc, th, pi, n, cols, xs, d_loc, d_theta, d_pi)
                     : row_log_p(0, 0, G, loc, th, pi, n, cols, xs, d_loc, d_theta, d_pi);
    w->nll[r] = -(float)log_p;
}

/* Every row, on n_threads OpenMP threads where the build has OpenMP (GCC's libgomp: inside a
 * torch process, torch's own thread pool), else on this thread. d_pi is not read without pi. */
void nb_nll_rows(int64_t n_rows, int64_t n_genes, int n_threads, int loc_is_log,
                 const float *loc, const float *theta, int64_t theta_stride,
                 const float *pi, int64_t pi_stride,
                 const int64_t *indptr, const int64_t *indices, const float *values,
                 float *nll, float *d_loc, float *d_theta, float *d_pi)
{
    pthread_once(&tables_once, fill_tables);
    const Work w = {n_genes, loc_is_log, loc, theta, pi, theta_stride, pi_stride, indptr, indices, values,
                    nll, d_loc, d_theta, d_pi};
    (void)n_threads;   /* read by the pragma only, which a build without OpenMP drops */
    #pragma omp parallel for schedule(static) num_threads(n_threads > 0 ? n_threads : 1) if (n_threads > 1 && n_rows > 1)
    for (int64_t r = 0; r < n_rows; r++) row(&w, r);
}
