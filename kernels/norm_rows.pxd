# Declarations of norm_rows.h (the row-norm family: LayerNorm, RMSNorm, residual add + norm;
# contract and maths there) and the OpenMP loops over its bodies, written once for every op of
# the family (layer_norm.pyx, rms_norm.pyx, add_norm.pyx).
#
# Table of contents
#   nf_nr_fwd_args, nf_nr_bwd_args     one call's buffers and sizes (untyped; f64 picks the body)
#   nf_nr_threads, nf_nr_ahead         thread plan, forward prefetch distance
#   nf_nr_bwd_scratch                  float64 scratch of the backward's fixed row blocks
#   nr_forward, nr_backward            the loops: rows over threads; row blocks, then columns
#
# Threads: forward gives each thread whole rows (static schedule); backward gives each thread
# whole row blocks, whose float64 dweight/dbias partials are then added in block order column
# chunk by column chunk — the blocks depend on (n, d) only, so the thread count never changes a
# result bit.
from cython.parallel cimport parallel, prange, threadid

from core cimport nf_index, nf_stream_fence


cdef extern from "norm_rows.h" nogil:
    int NF_NR_REDUCE_CHUNK

    ctypedef struct nf_nr_fwd_args:
        void *y
        void *s
        double *mean
        double *rstd
        const void *x
        const void *r
        const void *w
        const void *b
        void *rowbuf
        nf_index n, d, ahead
        double eps
        int stream, f64

    ctypedef struct nf_nr_bwd_args:
        void *dx
        void *dw
        void *db
        double *work
        const void *dy
        const void *x
        const void *ds
        const void *w
        const double *mean
        const double *rstd
        nf_index n, d, nb, rows_per_block, width
        int stream, f64

    ctypedef void (*nf_nr_fwd_fn)(const nf_nr_fwd_args *a, nf_index i, int tid) noexcept nogil
    ctypedef void (*nf_nr_bwd_fn)(const nf_nr_bwd_args *a, nf_index blk) noexcept nogil
    ctypedef void (*nf_nr_finish_fn)(const nf_nr_bwd_args *a, nf_index j0,
                                     nf_index j1) noexcept nogil

    int nf_nr_threads(nf_index work)
    nf_index nf_nr_ahead(nf_index d, nf_index itemsize)
    void nf_nr_bwd_plan(nf_index n, nf_index d, int want_w, int want_b,
                        nf_index *nb, nf_index *rows_per_block, nf_index *width)
    nf_index nf_nr_bwd_scratch(nf_index n, nf_index d, int want_w, int want_b)
    nf_nr_fwd_fn nf_nr_fwd_pick(const nf_nr_fwd_args *a, nf_index *step)
    nf_nr_bwd_fn nf_nr_bwd_pick(const nf_nr_bwd_args *a)
    nf_nr_finish_fn nf_nr_finish_pick(const nf_nr_bwd_args *a)


cdef inline void nr_forward(const nf_nr_fwd_args *a, int nt) noexcept nogil:
    """All rows of a forward call on nt threads (a.rowbuf holds nt rows when it is used)."""
    cdef nf_index k, step
    cdef int tid = 0
    cdef nf_nr_fwd_fn rows = nf_nr_fwd_pick(a, &step)
    cdef nf_index calls = (a.n + step - 1) // step
    if nt <= 1:                  # no parallel region: a small call does not pay for one
        for k in range(calls):
            rows(a, k * step, 0)
        if a.stream:
            nf_stream_fence()
        return
    with parallel(num_threads=nt):
        tid = threadid()
        for k in prange(calls, schedule='static'):
            rows(a, k * step, tid)
        if a.stream:
            nf_stream_fence()


cdef inline void nr_backward(nf_nr_bwd_args *a) noexcept nogil:
    """A backward call: plans the row blocks into a (a.dw/a.db say which partials; a.work holds
    nf_nr_bwd_scratch(...) values when one is wanted), runs the blocks, then adds their
    partials in block order into a.dw/a.db."""
    cdef nf_index blk, c, nc, j0, j1
    nf_nr_bwd_plan(a.n, a.d, a.dw != NULL, a.db != NULL, &a.nb, &a.rows_per_block, &a.width)
    cdef nf_nr_bwd_fn block = nf_nr_bwd_pick(a)
    cdef nf_nr_finish_fn finish = nf_nr_finish_pick(a)
    cdef int nt = nf_nr_threads(a.n * a.d)
    if nt <= 1:                  # no parallel region: a small call does not pay for one
        for blk in range(a.nb):
            block(a, blk)
        if a.stream:
            nf_stream_fence()
    else:
        with parallel(num_threads=nt):
            for blk in prange(a.nb, schedule='static'):
                block(a, blk)
            if a.stream:
                nf_stream_fence()
    if a.width > 0:
        nc = (a.width + NF_NR_REDUCE_CHUNK - 1) // NF_NR_REDUCE_CHUNK
        nt = nf_nr_threads(a.nb * a.width)
        if nt <= 1:
            finish(a, 0, a.width)
            return
        for c in prange(nc, schedule='static', num_threads=nt):
            j0 = c * NF_NR_REDUCE_CHUNK
            j1 = j0 + NF_NR_REDUCE_CHUNK
            if j1 > a.width:
                j1 = a.width
            finish(a, j0, j1)
