/* ffn_elementwise.h — the FFN's elementwise work between its GEMMs: bias + activation forward,
 * activation derivative backward, bias rows and column sums (kernels/ffn.pyx calls these).
 *
 * Contract: the caller passes a block of `m` rows of row-major matrices; row i of a matrix starts
 * at p + i * ld (ld >= the row's width).  Every pointer is valid for that block; m, h >= 1.
 * `h` is the number of hidden units: a plain activation's block rows are h wide, a gated one's
 * pre-activation rows are 2h wide ([gate | up], see below) and its activation rows h wide.
 * Per-column vectors (b1, dead, db1_acc) cover the whole row.  A block is walked row by row, so
 * per-column accumulations (db1_acc, db2_acc, dead) add rows in row order: the results do not
 * depend on how the caller threads its GEMMs.  Nothing here allocates or takes the GIL.
 *
 * Activations (NF_ACT_*; a gated code is its gate's code | NF_ACT_GATED):
 *   relu       a = max(v, 0)                        (NaN stays NaN)
 *   gelu       a = v * Phi(v),  Phi(v) = erfc(-v / sqrt 2) / 2        (exact GELU)
 *   gelu_tanh  a = v * sigmoid(2u),  u = sqrt(2/pi) (v + 0.044715 v^3)
 *              (= v/2 (1 + tanh u), written without the cancellation of 1 + tanh u for v << 0)
 *   silu       a = v * sigmoid(v)
 *   gated (reglu, geglu, swiglu: gate relu, gelu, silu), packed pre-activation v = [g | u]:
 *              a = act(g) * u,  g = v[:, :h], u = v[:, h:]
 * Derivatives: gelu' = Phi(v) + v phi(v);  gelu_tanh' = s + 2 v s (1 - s) u',  s = sigmoid(2u);
 * silu' = s (1 + v (1 - s)).  relu's backward needs no derivative: the gradient passes where the
 * saved output a is not <= 0 (PyTorch's threshold_backward), so NaN outputs pass it on.
 * Gated backward, dA the gradient of a:  dg = (dA * u) * act'(g)  (reglu: dA * u where g is not
 * <= 0, else 0),  du = dA * act(g).
 *
 * Every path is a loop per activation over a row (the activation code is dispatched once per
 * chunk of up to NF_CHUNK columns, outside the loop) that GCC vectorises in each NF_CLONES build:
 * ReLU directly, the smooth activations through vmath.h's branch-free exp and normal CDF
 * (libm's expf/erfcf are scalar calls GCC does not vectorise without -ffast-math, which is never
 * used: NaN and Inf propagate through every helper).  float gelu is computed in double from
 * vmath.h's nf_vphi_d and rounded once; double gelu still calls libm erfc (not vectorised).
 * Smooth and gated rows read their pre-activation in place, or from a small local copy where an
 * output is written over it (see ffn_elementwise_t.h).  Bodies are written once, in
 * ffn_elementwise_t.h, stamped for float (SUF f32) and double (f64).
 */
#ifndef NORMFFN_FFN_ELEMENTWISE_H
#define NORMFFN_FFN_ELEMENTWISE_H

#include <math.h>
#include <string.h>
#include "core.h"   /* nf_index, NF_CLONES, NF_INLINE, NF_T, NF_CHUNK */
#include "vmath.h"  /* nf_vgelu, nf_vgelu_tanh, nf_vsilu */

enum {
    NF_ACT_RELU = 0,
    NF_ACT_GELU = 1,
    NF_ACT_GELU_TANH = 2,
    NF_ACT_SILU = 3,
    NF_ACT_GATED = 8,                                  /* flag: a = act(gate) * up */
    NF_ACT_REGLU = NF_ACT_GATED | NF_ACT_RELU,
    NF_ACT_GEGLU = NF_ACT_GATED | NF_ACT_GELU,
    NF_ACT_SWIGLU = NF_ACT_GATED | NF_ACT_SILU,
};

#define T float
#define SUF f32
#include "ffn_elementwise_t.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "ffn_elementwise_t.h"
#undef T
#undef SUF

#endif /* NORMFFN_FFN_ELEMENTWISE_H */
