"""The C source of the ``native`` backend's inner loops, as a Python string (:mod:`.native` compiles it).

A string, not a ``.c`` file beside this one: a Flower app bundle (what ``flwr run`` ships to the SuperLink and
every SuperNode) carries only ``.py``, ``.toml``, ``.md``, ``.yaml`` and ``.json`` files, and its built-in
patterns cannot be widened, so a ``.c`` file would be missing wherever a deployment runs and those processes
would sum with the torch backend, to other rounding than ``devft simulate``.
"""

C_SOURCE = r"""/* The inner loops of devft's native CPU aggregation backend (loaded by native.py, which compiles this file
 * with the machine's C compiler on first use; native.py's docstring says why and how).
 *
 * The data is a list of runs: run r is len[r] elements that lie back to back in every client's buffer and
 * at out + off[r] in the output. src is the (runs x K) table of where each client's run starts.
 *
 *   devft_wsum_<t>:    out[off[r] + i] = sum_k w[k] * src[r*K + k][i]
 *   devft_sqnorms_<t>: acc[k] += sum_r sum_i (src[r*K + k][i] - centre[off[r] + i])^2   (centre may be NULL)
 *
 * Memory bandwidth is the limit. Every input element is read once; the output is produced one cache-sized
 * tile at a time, and the clients are taken four at a time, so each pass over a tile reads four input
 * streams at once. (One torch add_ per client reads one stream: about half of a copy's rate on the
 * development VM, docs/benchmarks.md, session 12.) Sums accumulate in the element type, fp32 or fp64, as
 * the torch backend's do; squares in short stretches of the element type, summed in fp64 (see
 * DEFINE_SQNORMS). No fast-math: NaN and Inf propagate, so the caller's finite check sees them.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define DEVFT_MIN(a, b) ((a) < (b) ? (a) : (b))

/* o[i] (=|+=) sum of the four streams' weighted elements at [at, at + n); four clients per pass. */
#define DEFINE_WSUM(T, NAME)                                                                               \
    static void NAME##_tile(T *restrict o, const T *const *s, int64_t at, const T *w, int64_t K,           \
                            int64_t n) {                                                                   \
        int64_t k = 0;                                                                                     \
        for (; k + 4 <= K; k += 4) {                                                                       \
            const T *a = s[k] + at, *b = s[k + 1] + at, *c = s[k + 2] + at, *d = s[k + 3] + at;            \
            const T wa = w[k], wb = w[k + 1], wc = w[k + 2], wd = w[k + 3];                                \
            if (k == 0)                                                                                    \
                for (int64_t i = 0; i < n; i++) o[i] = wa * a[i] + wb * b[i] + wc * c[i] + wd * d[i];      \
            else                                                                                           \
                for (int64_t i = 0; i < n; i++) o[i] += wa * a[i] + wb * b[i] + wc * c[i] + wd * d[i];     \
        }                                                                                                  \
        const int64_t left = K - k;                                                                        \
        if (left == 0) return;                                                                             \
        const T *a = s[k] + at;                                                                            \
        const T *b = left > 1 ? s[k + 1] + at : a;                                                         \
        const T *c = left > 2 ? s[k + 2] + at : a;                                                         \
        const T wa = w[k], wb = left > 1 ? w[k + 1] : 0, wc = left > 2 ? w[k + 2] : 0;                     \
        if (left == 1 && k == 0)                                                                           \
            for (int64_t i = 0; i < n; i++) o[i] = wa * a[i];                                              \
        else if (left == 1)                                                                                \
            for (int64_t i = 0; i < n; i++) o[i] += wa * a[i];                                             \
        else if (left == 2 && k == 0)                                                                      \
            for (int64_t i = 0; i < n; i++) o[i] = wa * a[i] + wb * b[i];                                  \
        else if (left == 2)                                                                                \
            for (int64_t i = 0; i < n; i++) o[i] += wa * a[i] + wb * b[i];                                 \
        else if (k == 0)                                                                                   \
            for (int64_t i = 0; i < n; i++) o[i] = wa * a[i] + wb * b[i] + wc * c[i];                      \
        else                                                                                               \
            for (int64_t i = 0; i < n; i++) o[i] += wa * a[i] + wb * b[i] + wc * c[i];                     \
    }                                                                                                      \
                                                                                                           \
    void NAME(T *out, const T *const *src, const int64_t *len, const int64_t *off, int64_t runs,           \
              int64_t K, const T *w, int64_t tile) {                                                       \
        for (int64_t r = 0; r < runs; r++)                                                                 \
            for (int64_t at = 0; at < len[r]; at += tile)                                                  \
                NAME##_tile(out + off[r] + at, src + r * K, at, w, K, DEVFT_MIN(tile, len[r] - at));       \
    }

/* The squared distance of one client's stretch from the centre (or from 0). Squares go into LANES partial
 * sums of type L (independent lanes vectorise without reassociating), each folded into a double every STRETCH
 * elements: fp32 data keeps fp32 lanes for speed, with at most STRETCH / LANES terms per partial sum. A
 * stretch whose lane sum is not finite (squares beyond 3.4e38), NaN, or below TINY (where squares under
 * 1.4e-45 would have been lost: below 1e-30, they could be 1e-12 of it) is summed again in double.
 * Differences are taken in the element type, as the torch backend takes them: one that overflows it gives
 * an infinite norm. */
#define STRETCH 1024
#define DEFINE_SQNORMS(T, L, LANES, TINY, NAME)                                                            \
    static double NAME##_exact(const T *x, const T *c, int64_t n) {                                        \
        double s = 0;                                                                                      \
        for (int64_t i = 0; i < n; i++) {                                                                  \
            const double v = c == NULL ? (double)x[i] : (double)(T)(x[i] - c[i]);                          \
            s += v * v;                                                                                    \
        }                                                                                                  \
        return s;                                                                                          \
    }                                                                                                      \
                                                                                                           \
    static double NAME##_one(const T *x, const T *c, int64_t n) {                                          \
        double s = 0;                                                                                      \
        int64_t i = 0;                                                                                     \
        while (n - i >= LANES) {                                                                           \
            const int64_t start = i, end = i + DEVFT_MIN(STRETCH, (n - i) / LANES * LANES);                \
            L p[LANES] = {0};                                                                              \
            if (c == NULL)                                                                                 \
                for (; i < end; i += LANES)                                                                \
                    for (int j = 0; j < LANES; j++) p[j] += (L)x[i + j] * (L)x[i + j];                     \
            else                                                                                           \
                for (; i < end; i += LANES)                                                                \
                    for (int j = 0; j < LANES; j++) {                                                      \
                        const L v = (L)x[i + j] - (L)c[i + j];                                             \
                        p[j] += v * v;                                                                     \
                    }                                                                                      \
            double part = 0;                                                                               \
            for (int j = 0; j < LANES; j++) part += p[j];                                                  \
            if (!(part >= TINY) || isinf(part))                                                            \
                part = NAME##_exact(x + start, c == NULL ? NULL : c + start, end - start);                 \
            s += part;                                                                                     \
        }                                                                                                  \
        return s + NAME##_exact(x + i, c == NULL ? NULL : c + i, n - i);                                   \
    }                                                                                                      \
                                                                                                           \
    void NAME(double *acc, const T *const *src, const int64_t *len, const int64_t *off, int64_t runs,      \
              int64_t K, const T *centre, int64_t tile) {                                                  \
        for (int64_t r = 0; r < runs; r++)                                                                 \
            for (int64_t at = 0; at < len[r]; at += tile) {                                                \
                const int64_t n = DEVFT_MIN(tile, len[r] - at);                                            \
                const T *c = centre == NULL ? NULL : centre + off[r] + at;                                 \
                for (int64_t k = 0; k < K; k++) acc[k] += NAME##_one(src[r * K + k] + at, c, n);           \
            }                                                                                              \
    }

DEFINE_WSUM(float, devft_wsum_f32)
DEFINE_WSUM(double, devft_wsum_f64)
DEFINE_SQNORMS(float, float, 16, 1e-30, devft_sqnorms_f32)
DEFINE_SQNORMS(double, double, 8, 0.0, devft_sqnorms_f64)
"""
