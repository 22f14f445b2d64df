// NF4's token product, one thread, weights hot in cache: the cycles each 64 values cost by two
// routes from 16 levels to integer products, on AVX2 and on AVX-512 VNNI (issue 13: is AVX2's NF4
// kernel bound by its byte shuffles, and would byte products instead of word products lift it?).
//
//   gcc -O2 -mavx2 -mfma -o /tmp/nf4r2 benchmarks/nf4_token_routes.c && /tmp/nf4r2 [ROWS] [REPEATS]
//   gcc -O2 -march=native -o /tmp/nf4r benchmarks/nf4_token_routes.c && /tmp/nf4r [ROWS] [REPEATS]
//
// - words (sli's AVX2 route, sli.kernels.simd_int8._words_avx2): each code's low and high level
//   byte looked up (two vpshufb), woven into 16-bit words (vpunpck{l,h}bw), multiplied by int16
//   activations (vpmaddwd): 4 shuffles, 4 unpacks, 4 word products a 64 values.
// - bytes: the levels rounded to 10 bits and held as L + 1024 = 32 h + l (h < 64, l < 32, so no
//   int16 pair saturates), two vpshufb and two vpmaddubsw against int8 activations, the pairs
//   widened once a step (vpmaddwd by 32 and by 1), 1024 * sum(x) taken back: no unpacks.
// - permw (sli's AVX-512 route): 64 bytes as 32 words, four vpermw, four vpdpwssd.
// - dpbusd: the exact 16-bit levels as L + 32768 = 256 h + l, two vpshufb and two vpdpbusd a 64.
// Each route's sums are checked against an exact scalar sum first. Cycles assume 3.6 GHz (what a
// dependent float multiply chain gives on the Zen 4 here); compare the routes, not the clock.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifndef COLS
#define COLS 4096
#endif
#define STEPS (COLS / 64)
#define GHZ 3.6

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static const float NF4[16] = {-1.0f, -0.6961928f, -0.5250731f, -0.3949175f, -0.2844414f, -0.1847734f,
                              -0.0910500f, 0.0f, 0.0795803f, 0.1609302f, 0.2461123f, 0.3379152f,
                              0.4407098f, 0.5626170f, 0.7229568f, 1.0f};

static float hsum256(__m256 f) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
  r = _mm_hadd_ps(r, r);
  r = _mm_hadd_ps(r, r);
  return _mm_cvtss_f32(r);
}

// x16: each step's 64 activations in the order the woven words meet them
__attribute__((noinline)) static float row_words(const uint8_t *p, const float *s, const int16_t *x,
                                                 __m256i lows, __m256i highs) {
  const __m256i nib = _mm256_set1_epi8(15);
  __m256 f = _mm256_setzero_ps();
  for (int st = 0; st < STEPS; st++) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)(p + 32 * st));
    __m256i codes[2] = {_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), _mm256_and_si256(raw, nib)};
    const __m256i *xv = (const __m256i *)(x + 64 * st);
    __m256i acc = _mm256_setzero_si256();
    for (int half = 0; half < 2; half++) {
      __m256i lb = _mm256_shuffle_epi8(lows, codes[half]), hb = _mm256_shuffle_epi8(highs, codes[half]);
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_unpacklo_epi8(lb, hb), _mm256_loadu_si256(xv + 2 * half)));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_unpackhi_epi8(lb, hb), _mm256_loadu_si256(xv + 2 * half + 1)));
    }
    f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_broadcast_ss(s + st), f);
  }
  return hsum256(f);
}

// x8: each step's even values (high nibbles), then its odd ones; corr: 1024 * their sums, per lane
__attribute__((noinline)) static float row_bytes(const uint8_t *p, const float *s, const int8_t *x, const int32_t *corr,
                                                 __m256i hs, __m256i ls) {
  const __m256i nib = _mm256_set1_epi8(15), by32 = _mm256_set1_epi16(32), by1 = _mm256_set1_epi16(1);
  __m256 f = _mm256_setzero_ps();
  for (int st = 0; st < STEPS; st++) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)(p + 32 * st));
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib), lo = _mm256_and_si256(raw, nib);
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + 64 * st)), x1 = _mm256_loadu_si256((const __m256i *)(x + 64 * st + 32));
    __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi8(hs, hi), x0),
                                  _mm256_maddubs_epi16(_mm256_shuffle_epi8(hs, lo), x1));
    __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi8(ls, hi), x0),
                                  _mm256_maddubs_epi16(_mm256_shuffle_epi8(ls, lo), x1));
    __m256i acc = _mm256_add_epi32(_mm256_madd_epi16(ph, by32), _mm256_madd_epi16(pl, by1));
    acc = _mm256_sub_epi32(acc, _mm256_loadu_si256((const __m256i *)(corr + 8 * st)));
    f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_broadcast_ss(s + st), f);
  }
  return hsum256(f);
}

#ifdef __AVX512VNNI__
static __m512 two_scales(const float *s) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(s)), _mm256_broadcast_ss(s + 1), 1);
}

// timing only (x16 in any order): four vpermw and four vpdpwssd a 128 values
__attribute__((noinline)) static float row_permw(const uint8_t *p, const float *s, const int16_t *x, __m512i table) {
  __m512 f = _mm512_setzero_ps();
  for (int st = 0; st < COLS / 128; st++) {
    __m512i c = _mm512_loadu_si512(p + 64 * st), acc = _mm512_setzero_si512();
    const __m512i *xv = (const __m512i *)(x + 128 * st);
    acc = _mm512_dpwssd_epi32(acc, _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 4), table), _mm512_loadu_si512(xv));
    acc = _mm512_dpwssd_epi32(acc, _mm512_permutexvar_epi16(c, table), _mm512_loadu_si512(xv + 1));
    acc = _mm512_dpwssd_epi32(acc, _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 12), table), _mm512_loadu_si512(xv + 2));
    acc = _mm512_dpwssd_epi32(acc, _mm512_permutexvar_epi16(_mm512_srli_epi16(c, 8), table), _mm512_loadu_si512(xv + 3));
    f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), two_scales(s + 2 * st), f);
  }
  return _mm512_reduce_add_ps(f);
}

// timing only: exact 16-bit levels as L + 32768 = 256 h + l, two vpshufb and two vpdpbusd a 64 values
__attribute__((noinline)) static float row_dpbusd(const uint8_t *p, const float *s, const int8_t *x, const int32_t *corr,
                                                  __m512i hs, __m512i ls) {
  const __m512i nib = _mm512_set1_epi8(15);
  __m512 f = _mm512_setzero_ps();
  for (int st = 0; st < COLS / 128; st++) {
    __m512i raw = _mm512_loadu_si512(p + 64 * st);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib), lo = _mm512_and_si512(raw, nib);
    __m512i x0 = _mm512_loadu_si512(x + 128 * st), x1 = _mm512_loadu_si512(x + 128 * st + 64);
    __m512i ah = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_shuffle_epi8(hs, hi), x0);
    ah = _mm512_dpbusd_epi32(ah, _mm512_shuffle_epi8(hs, lo), x1);
    __m512i al = _mm512_dpbusd_epi32(_mm512_loadu_si512(corr + 16 * st), _mm512_shuffle_epi8(ls, hi), x0);
    al = _mm512_dpbusd_epi32(al, _mm512_shuffle_epi8(ls, lo), x1);
    f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(ah, 8), al)), two_scales(s + 2 * st), f);
  }
  return _mm512_reduce_add_ps(f);
}
#endif

int main(int argc, char **argv) {
  int rows = argc > 1 ? atoi(argv[1]) : 128, reps = argc > 2 ? atoi(argv[2]) : 1000;
  uint8_t *p = aligned_alloc(64, (size_t)rows * COLS / 2);
  float *s = aligned_alloc(64, (size_t)rows * STEPS * 4);
  int16_t *x16 = aligned_alloc(64, COLS * 2);
  int8_t *x8 = aligned_alloc(64, COLS), xs[COLS];
  int32_t *corr = aligned_alloc(64, STEPS * 8 * 4), *no_corr = calloc(COLS / 8, 4);
  int16_t l16[16], l10[16];
  srand(1);
  for (long i = 0; i < (long)rows * COLS / 2; i++) p[i] = rand();
  for (long i = 0; i < (long)rows * STEPS; i++) s[i] = 0.01f * (1 + rand() % 100);
  for (int i = 0; i < COLS; i++) xs[i] = rand() % 255 - 127;
  for (int k = 0; k < 16; k++) l16[k] = (int16_t)lrintf(NF4[k] * 8128), l10[k] = (int16_t)lrintf(NF4[k] * 1023);
  for (int st = 0; st < STEPS; st++) {
    for (int part = 0; part < 2; part++)  // 0: high nibbles (value 2k of byte k), 1: low ones (2k + 1)
      for (int h = 0; h < 2; h++)
        for (int w = 0; w < 16; w++) x16[64 * st + 32 * part + 16 * h + w] = xs[64 * st + 2 * (16 * (w / 8) + 8 * h + w % 8) + part];
    for (int k = 0; k < 32; k++) x8[64 * st + k] = xs[64 * st + 2 * k], x8[64 * st + 32 + k] = xs[64 * st + 2 * k + 1];
    for (int j = 0; j < 8; j++) {
      int sum = 0;
      for (int v = 8 * j; v < 8 * j + 8; v++) sum += xs[64 * st + v];
      corr[8 * st + j] = 1024 * sum;
    }
  }
  uint8_t lows[32], highs[32], hs[64], ls[64], eh[64], el[64];
  for (int i = 0; i < 64; i++) {
    int v = l10[i % 16] + 1024, e = l16[i % 16] + 32768;
    if (i < 32) lows[i] = (uint16_t)l16[i % 16] & 255, highs[i] = (uint16_t)l16[i % 16] >> 8;
    hs[i] = v >> 5, ls[i] = v & 31, eh[i] = e >> 8, el[i] = e & 255;
  }
  __m256i low_t = _mm256_loadu_si256((void *)lows), high_t = _mm256_loadu_si256((void *)highs);
  __m256i h_t = _mm256_loadu_si256((void *)hs), l_t = _mm256_loadu_si256((void *)ls);
  double exact16 = 0, exact10 = 0;
  for (int st = 0; st < STEPS; st++) {
    long a16 = 0, a10 = 0;
    for (int k = 0; k < 32; k++) {
      uint8_t b = p[32 * st + k];
      a16 += (long)l16[b >> 4] * xs[64 * st + 2 * k] + (long)l16[b & 15] * xs[64 * st + 2 * k + 1];
      a10 += (long)l10[b >> 4] * xs[64 * st + 2 * k] + (long)l10[b & 15] * xs[64 * st + 2 * k + 1];
    }
    exact16 += a16 * (double)s[st], exact10 += a10 * (double)s[st];
  }
  printf("check: words %.1f (exact %.1f), bytes %.1f (exact %.1f)\n", row_words(p, s, x16, low_t, high_t), exact16,
         row_bytes(p, s, x8, corr, h_t, l_t), exact10);
  volatile float sink = 0;
  double n = (double)reps * rows * STEPS, t;
#define TIME(CALL) (t = now(), ({ for (int r = 0; r < reps; r++) for (int i = 0; i < rows; i++) sink += CALL; }), (now() - t) / n * GHZ * 1e9)
  for (int round = 0; round < 3; round++) {
    double w = TIME(row_words(p + (long)i * COLS / 2, s + (long)i * STEPS, x16, low_t, high_t));
    double b = TIME(row_bytes(p + (long)i * COLS / 2, s + (long)i * STEPS, x8, corr, h_t, l_t));
    printf("AVX2: words %.2f, bytes %.2f cycles / 64 values", w, b);
#ifdef __AVX512VNNI__
    __m512i table = _mm512_broadcast_i32x8(_mm256_set_m128i(_mm_loadu_si128((void *)(l16 + 8)), _mm_loadu_si128((void *)l16)));
    __m512i eh_t = _mm512_loadu_si512(eh), el_t = _mm512_loadu_si512(el);
    double pw = TIME(row_permw(p + (long)i * COLS / 2, s + (long)i * STEPS, x16, table));
    double db = TIME(row_dpbusd(p + (long)i * COLS / 2, s + (long)i * STEPS, x8, no_corr, eh_t, el_t));
    printf("; AVX-512: permw %.2f, dpbusd %.2f", pw, db);
#else
    (void)eh, (void)el, (void)no_corr;
#endif
    printf("\n");
  }
  return 0;
}
