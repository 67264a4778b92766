// Selective scan (Mamba v1) forward and backward on the CPU, one (batch, channel) row at a time.
//
// Built by harness_mixers/_native.py with g++ and called through ctypes, so it depends on no
// torch header (it compiles in about a second) and has no Python in its inner loop. Threads
// are Python's: each call does a range of tasks and ctypes releases the GIL meanwhile.
//
// Layouts (all contiguous, prepared by scan.py):
//   u, delta, z, out, du, ddelta, dz: (B, D, L)     A: (D, N)     Dv, delta_bias: (D,)
//   Bm, Cm: (B, G, L, N)  -- time-major, so the state loop over N reads contiguous memory
//   last: (B, D, N)
// A null pointer means "absent" (Dv, z, delta_bias, last).
#include <math.h>  // declares the vector exp variants under -ffast-math
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// exp underflows to a float32 denormal below about -87.3 and denormal arithmetic is very slow;
// such a decay is zero for every purpose (the next state forgets the old one), so write 0.
// Written as exp-then-select so that gcc vectorises it with glibc's vector exp (libmvec).
template <typename T> inline T decay(T x) {
    const T e = std::exp(x < T(-87) ? T(-87) : x);
    return x < T(-87) ? T(0) : e;
}

template <typename T> inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }

template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

template <typename T> struct Scan {
    const T *u, *delta, *A, *Bm, *Cm, *Dv, *z, *bias;
    int64_t nb, nd, nl, nn, ng;
    bool softplus_delta;

    inline T dt_at(int64_t d, const T* drow, int64_t t, T* pre) const {
        T x = drow[t] + (bias ? bias[d] : T(0));
        if (pre) *pre = x;
        return softplus_delta ? softplus(x) : x;
    }

    // Forward for tasks [begin, end), a task being one (b, d) row.
    void forward(T* out, T* last, int64_t begin, int64_t end) const {
        std::vector<T> h(nn), a(nn);
        const int64_t per_group = nd / ng;
        for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / nd, d = task % nd, g = d / per_group;
            const T* urow = u + task * nl;
            const T* drow = delta + task * nl;
            const T* zrow = z ? z + task * nl : nullptr;
            const T* Arow = A + d * nn;
            const T* Bg = Bm + (b * ng + g) * nl * nn;
            const T* Cg = Cm + (b * ng + g) * nl * nn;
            const T skip = Dv ? Dv[d] : T(0);
            T* orow = out + task * nl;
            for (int64_t n = 0; n < nn; ++n) h[n] = T(0);
            for (int64_t t = 0; t < nl; ++t) {
                const T dt = dt_at(d, drow, t, nullptr), ut = urow[t], dtu = dt * ut;
                const T* Bt = Bg + t * nn;
                const T* Ct = Cg + t * nn;
                // Two loops, so that the exp loop vectorises on its own.
                for (int64_t n = 0; n < nn; ++n) a[n] = dt * Arow[n];
                for (int64_t n = 0; n < nn; ++n) a[n] = decay(a[n]);
                T y = T(0);
                for (int64_t n = 0; n < nn; ++n) {
                    h[n] = a[n] * h[n] + dtu * Bt[n];
                    y += Ct[n] * h[n];
                }
                y += skip * ut;
                if (zrow) y *= zrow[t] * sigmoid(zrow[t]);
                orow[t] = y;
            }
            if (last)
                for (int64_t n = 0; n < nn; ++n) last[task * nn + n] = h[n];
        }
    }

    // Backward for tasks [begin, end), a task being (b, g, chunk): the channels d of group g in
    // chunk `chunk` of `nchunks`. Gradients of B and C sum over channels, so each task sums into
    // its own (L, N) slice of dB_part/dC_part (B, G, nchunks, L, N); the caller adds the chunks.
    // dA_part, dD_part, dbias_part are (B, D, N), (B, D), (B, D): summed over b by the caller.
    void backward(const T* dout, T* du, T* ddelta, T* dz, T* dA_part, T* dD_part, T* dbias_part,
                  T* dB_part, T* dC_part, int64_t nchunks, int64_t begin, int64_t end) const {
        const int64_t per_group = nd / ng;
        std::vector<T> H(nl * nn), dts(nl), pre(nl), ys(nl), g(nn), a(nn);
        for (int64_t task = begin; task < end; ++task) {
            const int64_t chunk = task % nchunks, bg = task / nchunks, b = bg / ng, grp = bg % ng;
            const int64_t d0 = grp * per_group + chunk * per_group / nchunks;
            const int64_t d1 = grp * per_group + (chunk + 1) * per_group / nchunks;
            const T* Bg = Bm + bg * nl * nn;
            const T* Cg = Cm + bg * nl * nn;
            T* dBg = dB_part + task * nl * nn;
            T* dCg = dC_part + task * nl * nn;
            for (int64_t i = 0; i < nl * nn; ++i) dBg[i] = dCg[i] = T(0);
            for (int64_t d = d0; d < d1; ++d) {
                const int64_t row = b * nd + d;
                const T* urow = u + row * nl;
                const T* drow = delta + row * nl;
                const T* zrow = z ? z + row * nl : nullptr;
                const T* gout = dout + row * nl;
                const T* Arow = A + d * nn;
                const T skip = Dv ? Dv[d] : T(0);
                // Recompute the states h_t (stored) and the pre-gate outputs y_t.
                for (int64_t n = 0; n < nn; ++n) g[n] = T(0);
                for (int64_t t = 0; t < nl; ++t) {
                    const T dt = dt_at(d, drow, t, &pre[t]), dtu = dt * urow[t];
                    dts[t] = dt;
                    const T* Bt = Bg + t * nn;
                    const T* Ct = Cg + t * nn;
                    T* Ht = H.data() + t * nn;
                    const T* Hp = t ? Ht - nn : g.data();  // g is zero here: h_{-1} = 0
                    for (int64_t n = 0; n < nn; ++n) a[n] = dt * Arow[n];
                    for (int64_t n = 0; n < nn; ++n) a[n] = decay(a[n]);
                    T y = T(0);
                    for (int64_t n = 0; n < nn; ++n) {
                        Ht[n] = a[n] * Hp[n] + dtu * Bt[n];
                        y += Ct[n] * Ht[n];
                    }
                    ys[t] = y + skip * urow[t];
                }
                // Reverse sweep: g carries a_{t+1} * dL/dh_{t+1} back in time.
                T dskip = T(0), dbias = T(0);
                T* dArow = dA_part + row * nn;
                for (int64_t n = 0; n < nn; ++n) dArow[n] = T(0);
                for (int64_t t = nl - 1; t >= 0; --t) {
                    const T dt = dts[t], ut = urow[t];
                    T dy = gout[t];
                    if (zrow) {
                        const T zt = zrow[t], s = sigmoid(zt);
                        dz[row * nl + t] = dy * ys[t] * s * (T(1) + zt * (T(1) - s));
                        dy *= zt * s;
                    }
                    dskip += dy * ut;
                    const T* Bt = Bg + t * nn;
                    const T* Ct = Cg + t * nn;
                    const T* Ht = H.data() + t * nn;
                    T* dBt = dBg + t * nn;
                    T* dCt = dCg + t * nn;
                    for (int64_t n = 0; n < nn; ++n) a[n] = dt * Arow[n];
                    for (int64_t n = 0; n < nn; ++n) a[n] = decay(a[n]);
                    T dut = dy * skip, ddt = T(0);
                    for (int64_t n = 0; n < nn; ++n) {
                        const T dh = dy * Ct[n] + g[n];
                        const T hprev = t ? Ht[n - nn] : T(0);
                        const T dlog = dh * hprev * a[n];  // d loss / d (dt * A_n)
                        dCt[n] += dy * Ht[n];
                        dBt[n] += dh * dt * ut;
                        dut += dh * dt * Bt[n];
                        ddt += dh * Bt[n] * ut + dlog * Arow[n];
                        dArow[n] += dlog * dt;
                        g[n] = a[n] * dh;
                    }
                    // torch's softplus: linear above 20, where its gradient is exactly 1.
                    const T dpre = softplus_delta && pre[t] <= T(20) ? ddt * sigmoid(pre[t]) : ddt;
                    ddelta[row * nl + t] = dpre;
                    dbias += dpre;
                    du[row * nl + t] = dut;
                }
                dD_part[row] = dskip;
                dbias_part[row] = dbias;
            }
        }
    }
};

template <typename T>
Scan<T> make(const T* u, const T* delta, const T* A, const T* Bm, const T* Cm, const T* Dv, const T* z,
             const T* bias, int64_t nb, int64_t nd, int64_t nl, int64_t nn, int64_t ng, int32_t sp) {
    return Scan<T>{u, delta, A, Bm, Cm, Dv, z, bias, nb, nd, nl, nn, ng, sp != 0};
}

}  // namespace

#define SCAN_ARGS(T)                                                                                   \
    const T *u, const T *delta, const T *A, const T *Bm, const T *Cm, const T *Dv, const T *z,       \
        const T *bias, int64_t nb, int64_t nd, int64_t nl, int64_t nn, int64_t ng, int32_t sp
#define SCAN_PASS u, delta, A, Bm, Cm, Dv, z, bias, nb, nd, nl, nn, ng, sp

#define EXPORT(T, SUFFIX)                                                                              \
    extern "C" void scan_fwd_##SUFFIX(SCAN_ARGS(T), T* out, T* last, int64_t begin, int64_t end) {   \
        make<T>(SCAN_PASS).forward(out, last, begin, end);                                            \
    }                                                                                                  \
    extern "C" void scan_bwd_##SUFFIX(SCAN_ARGS(T), const T* dout, T* du, T* ddelta, T* dz, T* dA,  \
                                      T* dD, T* dbias, T* dB, T* dC, int64_t nchunks, int64_t begin, \
                                      int64_t end) {                                                  \
        make<T>(SCAN_PASS).backward(dout, du, ddelta, dz, dA, dD, dbias, dB, dC, nchunks, begin, end); \
    }

EXPORT(float, f32)
EXPORT(double, f64)
