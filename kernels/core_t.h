/* core_t.h — the typed core helpers, written once; core.h includes this file twice, with
 * T = float, SUF = f32 and T = double, SUF = f64.  No include guard, on purpose.
 * NF_T(name) expands to name_SUF. */

/* The float64 mean as the pair a row is centred with: ((x - hi) - lo).  float32: hi + lo carry
 * ~48 bits of the mean; float64: hi is the mean, lo is 0. */
NF_INLINE void NF_T(nf_mean_split)(double mean, T *hi, T *lo)
{
    if (sizeof(T) == sizeof(float)) {
        float h, l;
        nf_split(mean, &h, &l);
        *hi = (T)h;
        *lo = (T)l;
    } else {
        *hi = (T)mean;
        *lo = 0;
    }
}

/* The blocked sum, written once: returns sum(v) (SQ: sum(v * v)) over v = x[0:n] (ADD:
 * v = x + r, rounded once in the input precision and stored to s[0:n]).  NF_LANES partial sums
 * in the input precision over NF_BLOCK elements, flushed to float64 lanes, then a fixed tree
 * (see core.h).  ADD and SQ are literals at every call, so each combination compiles to its own
 * branch-free loop.  n >= 0. */
/* NB (a literal, <= NF_MAX_NB) consecutive full blocks of nf_sum_ex, at once: each block has its
 * own partial sums, so the adds of different blocks overlap in the pipeline instead of waiting
 * on one dependency chain, and the partials are flushed to acc in block order — exactly the
 * operations, in the same order per accumulator, of one block at a time. */
NF_INLINE void NF_T(nf_sum_blocks)(double *restrict acc, T *restrict s, const T *restrict x,
                                   const T *restrict r, const int NB, const int ADD,
                                   const int SQ)
{
    T p[NF_MAX_NB][NF_LANES] = {{0}};
    for (nf_index j = 0; j < NF_BLOCK; j += NF_LANES)
        for (int b = 0; b < NB; b++)
            for (int k = 0; k < NF_LANES; k++) {
                nf_index o = b * NF_BLOCK + j + k;
                T v = ADD ? x[o] + r[o] : x[o];
                if (ADD) s[o] = v;
                p[b][k] += SQ ? v * v : v;
            }
    for (int b = 0; b < NB; b++)
        for (int k = 0; k < NF_LANES; k++) acc[k] += (double)p[b][k];
}

NF_INLINE double NF_T(nf_sum_ex)(T *restrict s, const T *restrict x, const T *restrict r,
                                 nf_index n, const int ADD, const int SQ)
{
    double acc[NF_LANES] = {0};
    nf_index i = 0;
    for (; n - i >= NF_MAX_NB * NF_BLOCK; i += NF_MAX_NB * NF_BLOCK)
        NF_T(nf_sum_blocks)(acc, ADD ? s + i : s, x + i, ADD ? r + i : r, NF_MAX_NB, ADD, SQ);
    T *si = ADD ? s + i : s;        /* s and r are NULL without ADD: no offset on them */
    const T *ri = ADD ? r + i : r;
    switch ((n - i) / NF_BLOCK) {   /* the remaining full blocks, fewer than NF_MAX_NB */
    case 3: NF_T(nf_sum_blocks)(acc, si, x + i, ri, 3, ADD, SQ); i += 3 * NF_BLOCK; break;
    case 2: NF_T(nf_sum_blocks)(acc, si, x + i, ri, 2, ADD, SQ); i += 2 * NF_BLOCK; break;
    case 1: NF_T(nf_sum_blocks)(acc, si, x + i, ri, 1, ADD, SQ); i += NF_BLOCK; break;
    }
    if (i + NF_LANES <= n) {        /* a last partial block, whole lanes */
        T p[NF_LANES] = {0};
        for (; i + NF_LANES <= n; i += NF_LANES)
            for (int k = 0; k < NF_LANES; k++) {
                T v = ADD ? x[i + k] + r[i + k] : x[i + k];
                if (ADD) s[i + k] = v;
                p[k] += SQ ? v * v : v;
            }
        for (int k = 0; k < NF_LANES; k++) acc[k] += (double)p[k];
    }
    double t = 0.0;
    for (; i < n; i++) {
        T v = ADD ? x[i] + r[i] : x[i];
        if (ADD) s[i] = v;
        t += SQ ? (double)v * (double)v : (double)v;
    }
    return t + nf_tree_sum(acc);
}

/* sum(x[0:n]), blocked (nf_sum_ex without residual or square).  n >= 0. */
NF_INLINE double NF_T(nf_sum)(const T *x, nf_index n)
{
    return NF_T(nf_sum_ex)(NULL, x, NULL, n, 0, 0);
}

/* Returns sum((x - mean)^2) and stores sum(x - mean) in *dev: the corrected two-pass algorithm
 * of Chan, Golub & LeVeque (mean + dev/n is the mean with the first pass's rounding error
 * removed, ssd - dev^2/n the matching sum of squares).  x - mean is formed in the input
 * precision from the (hi, lo) split, exact near the mean.  Meanwhile prefetches pf[0:n] (the
 * next row a caller will read; may equal x).  n >= 0. */
/* NB (a literal, <= NF_MAX_NB) consecutive full blocks of nf_ssd at once, as nf_sum_blocks. */
NF_INLINE void NF_T(nf_ssd_blocks)(double *restrict acc, double *restrict accd,
                                   const T *restrict x, const T *pf, T mh, T ml, const int NB)
{
    T p[NF_MAX_NB][NF_LANES] = {{0}}, pd[NF_MAX_NB][NF_LANES] = {{0}};
    for (nf_index j = 0; j < NF_BLOCK; j += NF_LANES)
        for (int b = 0; b < NB; b++) {
            nf_prefetch_range(pf + b * NF_BLOCK + j, 0, NF_LANES * sizeof(T));
            for (int k = 0; k < NF_LANES; k++) {
                T t = (x[b * NF_BLOCK + j + k] - mh) - ml;
                pd[b][k] += t;
                p[b][k] += t * t;
            }
        }
    for (int b = 0; b < NB; b++)
        for (int k = 0; k < NF_LANES; k++) {
            acc[k] += (double)p[b][k];
            accd[k] += (double)pd[b][k];
        }
}

NF_INLINE double NF_T(nf_ssd)(const T *x, nf_index n, double mean, const T *pf, double *dev)
{
    double acc[NF_LANES] = {0}, accd[NF_LANES] = {0};
    T mh, ml;
    NF_T(nf_mean_split)(mean, &mh, &ml);
    nf_index i = 0;
    enum { NB = sizeof(T) == sizeof(float) ? NF_MAX_NB : NF_MAX_NB / 2 };  /* registers */
    for (; n - i >= NB * NF_BLOCK; i += NB * NF_BLOCK)
        NF_T(nf_ssd_blocks)(acc, accd, x + i, pf + i, mh, ml, NB);
    switch ((n - i) / NF_BLOCK) {   /* the remaining full blocks, fewer than NB */
    case 3: NF_T(nf_ssd_blocks)(acc, accd, x + i, pf + i, mh, ml, 3); i += 3 * NF_BLOCK; break;
    case 2: NF_T(nf_ssd_blocks)(acc, accd, x + i, pf + i, mh, ml, 2); i += 2 * NF_BLOCK; break;
    case 1: NF_T(nf_ssd_blocks)(acc, accd, x + i, pf + i, mh, ml, 1); i += NF_BLOCK; break;
    }
    if (i + NF_LANES <= n) {        /* a last partial block, whole lanes */
        T p[NF_LANES] = {0}, pd[NF_LANES] = {0};
        for (; i + NF_LANES <= n; i += NF_LANES) {
            nf_prefetch_range(pf + i, 0, NF_LANES * sizeof(T));
            for (int k = 0; k < NF_LANES; k++) {
                T t = (x[i + k] - mh) - ml;
                pd[k] += t;
                p[k] += t * t;
            }
        }
        for (int k = 0; k < NF_LANES; k++) {
            acc[k] += (double)p[k];
            accd[k] += (double)pd[k];
        }
    }
    if (i < n) __builtin_prefetch(pf + i, 0, 2);
    double s = 0.0, sd = 0.0;
    for (; i < n; i++) { double t = (double)x[i] - mean; sd += t; s += t * t; }
    *dev = sd + nf_tree_sum(accd);
    return s + nf_tree_sum(acc);
}
