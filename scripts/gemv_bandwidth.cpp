// GB/s of the GEMV kernels against a plain read loop: one thread, thread CPU time, variants interleaved, median (best) of R passes over 384 MB.
// Copies of the csrc/gemv_avx2.h kernels and of gemv_avx512.h fp32 one (its bf16 copy here has no prefetch), plus bf16 dot-product (vdpbf16ps) and prefetch variants. benchmarks/RESULTS.md, Update 12.
//   g++ -O3 -mavx2 -mfma -w -std=c++20 scripts/gemv_bandwidth.cpp -o /tmp/gemv_bandwidth && /tmp/gemv_bandwidth 896 11
#include <immintrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <ctime>
#include <vector>
#include <algorithm>
#include <functional>
#include <string>
static double tcpu(){timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static inline float hsum(__m256 v){__m128 s=_mm_add_ps(_mm256_castps256_ps128(v),_mm256_extractf128_ps(v,1));s=_mm_add_ps(s,_mm_movehl_ps(s,s));s=_mm_add_ss(s,_mm_movehdup_ps(s));return _mm_cvtss_f32(s);}
static inline __m128 hsum4(__m256 s0,__m256 s1,__m256 s2,__m256 s3){__m256 h=_mm256_hadd_ps(_mm256_hadd_ps(s0,s1),_mm256_hadd_ps(s2,s3));return _mm_add_ps(_mm256_castps256_ps128(h),_mm256_extractf128_ps(h,1));}
__attribute__((target("avx2,fma"))) void dot4_f32_avx2(const float* w,int64_t K,int64_t q,const float* x,float* y){
  const float *w0=w,*w1=w+q*K,*w2=w+2*q*K,*w3=w+3*q*K;
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0,b0=a0,b1=a0,b2=a0,b3=a0; int64_t k=0;
  for(;k+16<=K;k+=16){const __m256 x0=_mm256_loadu_ps(x+k),x1=_mm256_loadu_ps(x+k+8);
    a0=_mm256_fmadd_ps(_mm256_loadu_ps(w0+k),x0,a0);a1=_mm256_fmadd_ps(_mm256_loadu_ps(w1+k),x0,a1);
    a2=_mm256_fmadd_ps(_mm256_loadu_ps(w2+k),x0,a2);a3=_mm256_fmadd_ps(_mm256_loadu_ps(w3+k),x0,a3);
    b0=_mm256_fmadd_ps(_mm256_loadu_ps(w0+k+8),x1,b0);b1=_mm256_fmadd_ps(_mm256_loadu_ps(w1+k+8),x1,b1);
    b2=_mm256_fmadd_ps(_mm256_loadu_ps(w2+k+8),x1,b2);b3=_mm256_fmadd_ps(_mm256_loadu_ps(w3+k+8),x1,b3);}
  alignas(16) float s[4];_mm_store_ps(s,hsum4(_mm256_add_ps(a0,b0),_mm256_add_ps(a1,b1),_mm256_add_ps(a2,b2),_mm256_add_ps(a3,b3)));
  for(;k<K;++k){s[0]+=w0[k]*x[k];s[1]+=w1[k]*x[k];s[2]+=w2[k]*x[k];s[3]+=w3[k]*x[k];}
  y[0]=s[0];y[q]=s[1];y[2*q]=s[2];y[3*q]=s[3];}
// same, rows side by side (consecutive)
__attribute__((target("avx512f"))) void dot4_f32_512(const float* w,int64_t K,int64_t q,const float* x,float* y){
  const float *w0=w,*w1=w+q*K,*w2=w+2*q*K,*w3=w+3*q*K;
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,b0=a0,b1=a0,b2=a0,b3=a0; int64_t k=0;
  for(;k+32<=K;k+=32){const __m512 x0=_mm512_loadu_ps(x+k),x1=_mm512_loadu_ps(x+k+16);
    a0=_mm512_fmadd_ps(_mm512_loadu_ps(w0+k),x0,a0);a1=_mm512_fmadd_ps(_mm512_loadu_ps(w1+k),x0,a1);
    a2=_mm512_fmadd_ps(_mm512_loadu_ps(w2+k),x0,a2);a3=_mm512_fmadd_ps(_mm512_loadu_ps(w3+k),x0,a3);
    b0=_mm512_fmadd_ps(_mm512_loadu_ps(w0+k+16),x1,b0);b1=_mm512_fmadd_ps(_mm512_loadu_ps(w1+k+16),x1,b1);
    b2=_mm512_fmadd_ps(_mm512_loadu_ps(w2+k+16),x1,b2);b3=_mm512_fmadd_ps(_mm512_loadu_ps(w3+k+16),x1,b3);}
  float s[4]={_mm512_reduce_add_ps(_mm512_add_ps(a0,b0)),_mm512_reduce_add_ps(_mm512_add_ps(a1,b1)),_mm512_reduce_add_ps(_mm512_add_ps(a2,b2)),_mm512_reduce_add_ps(_mm512_add_ps(a3,b3))};
  for(;k<K;++k){s[0]+=w0[k]*x[k];s[1]+=w1[k]*x[k];s[2]+=w2[k]*x[k];s[3]+=w3[k]*x[k];}
  y[0]=s[0];y[q]=s[1];y[2*q]=s[2];y[3*q]=s[3];}
// 1-row AVX-512 with 4 accumulators (single stream)
__attribute__((target("avx512f"))) float dot1_512(const float* w,int64_t K,const float* x){
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;int64_t k=0;
  for(;k+64<=K;k+=64){a0=_mm512_fmadd_ps(_mm512_loadu_ps(w+k),_mm512_loadu_ps(x+k),a0);a1=_mm512_fmadd_ps(_mm512_loadu_ps(w+k+16),_mm512_loadu_ps(x+k+16),a1);a2=_mm512_fmadd_ps(_mm512_loadu_ps(w+k+32),_mm512_loadu_ps(x+k+32),a2);a3=_mm512_fmadd_ps(_mm512_loadu_ps(w+k+48),_mm512_loadu_ps(x+k+48),a3);}
  for(;k+16<=K;k+=16)a0=_mm512_fmadd_ps(_mm512_loadu_ps(w+k),_mm512_loadu_ps(x+k),a0);
  float s=_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3)));for(;k<K;++k)s+=w[k]*x[k];return s;}
__attribute__((target("avx2,fma"))) void dot4_bf16_avx2(const uint16_t* w,int64_t K,int64_t q,const float* xe,const float* xo,float* y){
  const __m256i high=_mm256_set1_epi32((int)0xFFFF0000u);
  const uint16_t *w0=w,*w1=w+q*K,*w2=w+2*q*K,*w3=w+3*q*K;
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0,b0=a0,b1=a0,b2=a0,b3=a0;int64_t k=0;
  auto row=[&](const uint16_t* wr,__m256 e,__m256 o,__m256&a,__m256&b){const __m256i v=_mm256_loadu_si256((const __m256i*)(wr+k));
    a=_mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v,16)),e,a);b=_mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v,high)),o,b);};
  for(;k+16<=K;k+=16){const __m256 e=_mm256_loadu_ps(xe+k/2),o=_mm256_loadu_ps(xo+k/2);row(w0,e,o,a0,b0);row(w1,e,o,a1,b1);row(w2,e,o,a2,b2);row(w3,e,o,a3,b3);}
  alignas(16) float s[4];_mm_store_ps(s,hsum4(_mm256_add_ps(a0,b0),_mm256_add_ps(a1,b1),_mm256_add_ps(a2,b2),_mm256_add_ps(a3,b3)));
  y[0]=s[0];y[q]=s[1];y[2*q]=s[2];y[3*q]=s[3];}
__attribute__((target("avx512f,avx512bw"))) void dot4_bf16_512(const uint16_t* w,int64_t K,int64_t q,const float* xe,const float* xo,float* y){
  const __m512i high=_mm512_set1_epi32((int)0xFFFF0000u);
  const uint16_t *w0=w,*w1=w+q*K,*w2=w+2*q*K,*w3=w+3*q*K;
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,b0=a0,b1=a0,b2=a0,b3=a0;int64_t k=0;
#define ROW512(wr,e,o,a,b) {const __m512i v=_mm512_loadu_si512((const void*)(wr+k)); a=_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v,16)),e,a);b=_mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v,high)),o,b);}
  for(;k+32<=K;k+=32){const __m512 e=_mm512_loadu_ps(xe+k/2),o=_mm512_loadu_ps(xo+k/2);ROW512(w0,e,o,a0,b0);ROW512(w1,e,o,a1,b1);ROW512(w2,e,o,a2,b2);ROW512(w3,e,o,a3,b3);}
  float s[4]={_mm512_reduce_add_ps(_mm512_add_ps(a0,b0)),_mm512_reduce_add_ps(_mm512_add_ps(a1,b1)),_mm512_reduce_add_ps(_mm512_add_ps(a2,b2)),_mm512_reduce_add_ps(_mm512_add_ps(a3,b3))};
  y[0]=s[0];y[q]=s[1];y[2*q]=s[2];y[3*q]=s[3];}
// bf16 via vdpbf16ps with x rounded to bf16 (x pairs packed)
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot4_bf16_dp(const uint16_t* w,int64_t K,int64_t q,const uint16_t* xb,float* y){
  const uint16_t *w0=w,*w1=w+q*K,*w2=w+2*q*K,*w3=w+3*q*K;
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;int64_t k=0;
  for(;k+32<=K;k+=32){__m512bh xv=(__m512bh)_mm512_loadu_si512(xb+k);
    a0=_mm512_dpbf16_ps(a0,(__m512bh)_mm512_loadu_si512(w0+k),xv);a1=_mm512_dpbf16_ps(a1,(__m512bh)_mm512_loadu_si512(w1+k),xv);
    a2=_mm512_dpbf16_ps(a2,(__m512bh)_mm512_loadu_si512(w2+k),xv);a3=_mm512_dpbf16_ps(a3,(__m512bh)_mm512_loadu_si512(w3+k),xv);}
  y[0]=_mm512_reduce_add_ps(a0);y[q]=_mm512_reduce_add_ps(a1);y[2*q]=_mm512_reduce_add_ps(a2);y[3*q]=_mm512_reduce_add_ps(a3);}
__attribute__((target("avx512f"))) float readsum512(const float* p,int64_t n){__m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0;for(int64_t i=0;i+64<=n;i+=64){a0=_mm512_add_ps(a0,_mm512_loadu_ps(p+i));a1=_mm512_add_ps(a1,_mm512_loadu_ps(p+i+16));a2=_mm512_add_ps(a2,_mm512_loadu_ps(p+i+32));a3=_mm512_add_ps(a3,_mm512_loadu_ps(p+i+48));}return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3)));}
__attribute__((target("avx2"))) float readsum256(const float* p,int64_t n){__m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0;for(int64_t i=0;i+32<=n;i+=32){a0=_mm256_add_ps(a0,_mm256_loadu_ps(p+i));a1=_mm256_add_ps(a1,_mm256_loadu_ps(p+i+8));a2=_mm256_add_ps(a2,_mm256_loadu_ps(p+i+16));a3=_mm256_add_ps(a3,_mm256_loadu_ps(p+i+24));}return hsum(_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)));}

template<int PF>
__attribute__((target("avx512f"))) void dot4_f32_512pf(const float* w,int64_t K,int64_t q,const float* x,float* y){
  const float *w0=w,*w1=w+q*K,*w2=w+2*q*K,*w3=w+3*q*K;
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,b0=a0,b1=a0,b2=a0,b3=a0; int64_t k=0;
  for(;k+32<=K;k+=32){const __m512 x0=_mm512_loadu_ps(x+k),x1=_mm512_loadu_ps(x+k+16);
    _mm_prefetch((const char*)(w0+k+PF),_MM_HINT_T0);_mm_prefetch((const char*)(w0+k+PF+16),_MM_HINT_T0);
    _mm_prefetch((const char*)(w1+k+PF),_MM_HINT_T0);_mm_prefetch((const char*)(w1+k+PF+16),_MM_HINT_T0);
    _mm_prefetch((const char*)(w2+k+PF),_MM_HINT_T0);_mm_prefetch((const char*)(w2+k+PF+16),_MM_HINT_T0);
    _mm_prefetch((const char*)(w3+k+PF),_MM_HINT_T0);_mm_prefetch((const char*)(w3+k+PF+16),_MM_HINT_T0);
    a0=_mm512_fmadd_ps(_mm512_loadu_ps(w0+k),x0,a0);a1=_mm512_fmadd_ps(_mm512_loadu_ps(w1+k),x0,a1);
    a2=_mm512_fmadd_ps(_mm512_loadu_ps(w2+k),x0,a2);a3=_mm512_fmadd_ps(_mm512_loadu_ps(w3+k),x0,a3);
    b0=_mm512_fmadd_ps(_mm512_loadu_ps(w0+k+16),x1,b0);b1=_mm512_fmadd_ps(_mm512_loadu_ps(w1+k+16),x1,b1);
    b2=_mm512_fmadd_ps(_mm512_loadu_ps(w2+k+16),x1,b2);b3=_mm512_fmadd_ps(_mm512_loadu_ps(w3+k+16),x1,b3);}
  float s[4]={_mm512_reduce_add_ps(_mm512_add_ps(a0,b0)),_mm512_reduce_add_ps(_mm512_add_ps(a1,b1)),_mm512_reduce_add_ps(_mm512_add_ps(a2,b2)),_mm512_reduce_add_ps(_mm512_add_ps(a3,b3))};
  for(;k<K;++k){s[0]+=w0[k]*x[k];s[1]+=w1[k]*x[k];s[2]+=w2[k]*x[k];s[3]+=w3[k]*x[k];}
  y[0]=s[0];y[q]=s[1];y[2*q]=s[2];y[3*q]=s[3];}
template<int PF>
__attribute__((target("avx2,fma"))) void dot4_f32_avx2pf(const float* w,int64_t K,int64_t q,const float* x,float* y){
  const float *w0=w,*w1=w+q*K,*w2=w+2*q*K,*w3=w+3*q*K;
  __m256 a0=_mm256_setzero_ps(),a1=a0,a2=a0,a3=a0,b0=a0,b1=a0,b2=a0,b3=a0; int64_t k=0;
  for(;k+16<=K;k+=16){const __m256 x0=_mm256_loadu_ps(x+k),x1=_mm256_loadu_ps(x+k+8);
    _mm_prefetch((const char*)(w0+k+PF),_MM_HINT_T0);_mm_prefetch((const char*)(w1+k+PF),_MM_HINT_T0);
    _mm_prefetch((const char*)(w2+k+PF),_MM_HINT_T0);_mm_prefetch((const char*)(w3+k+PF),_MM_HINT_T0);
    a0=_mm256_fmadd_ps(_mm256_loadu_ps(w0+k),x0,a0);a1=_mm256_fmadd_ps(_mm256_loadu_ps(w1+k),x0,a1);
    a2=_mm256_fmadd_ps(_mm256_loadu_ps(w2+k),x0,a2);a3=_mm256_fmadd_ps(_mm256_loadu_ps(w3+k),x0,a3);
    b0=_mm256_fmadd_ps(_mm256_loadu_ps(w0+k+8),x1,b0);b1=_mm256_fmadd_ps(_mm256_loadu_ps(w1+k+8),x1,b1);
    b2=_mm256_fmadd_ps(_mm256_loadu_ps(w2+k+8),x1,b2);b3=_mm256_fmadd_ps(_mm256_loadu_ps(w3+k+8),x1,b3);}
  alignas(16) float s[4];_mm_store_ps(s,hsum4(_mm256_add_ps(a0,b0),_mm256_add_ps(a1,b1),_mm256_add_ps(a2,b2),_mm256_add_ps(a3,b3)));
  for(;k<K;++k){s[0]+=w0[k]*x[k];s[1]+=w1[k]*x[k];s[2]+=w2[k]*x[k];s[3]+=w3[k]*x[k];}
  y[0]=s[0];y[q]=s[1];y[2*q]=s[2];y[3*q]=s[3];}
volatile float sink;
int main(int argc,char**argv){
  int64_t K=atoi(argv[1]); int64_t total=(int64_t)384<<20; // bytes of fp32 per pass
  int64_t N=total/4/K/4*4; int nm=1; // one big matrix of N rows
  std::vector<float> W(N*K),x(K),y(N); for(int64_t i=0;i<N*K;++i)W[i]=(float)((i*2654435761u)%1000)/1000.f-0.5f; for(int64_t i=0;i<K;++i)x[i]=(float)(i%7)/7.f;
  std::vector<uint16_t> Wb(2*N*K); for(int64_t i=0;i<2*N*K;++i){float f=W[i%(N*K)];uint32_t u;memcpy(&u,&f,4);Wb[i]=u>>16;} // bf16: 2N rows, same bytes
  std::vector<float> xe(K/2+1),xo(K/2+1);for(int64_t j=0;j+1<K;j+=2){xe[j/2]=x[j];xo[j/2]=x[j+1];}
  std::vector<uint16_t> xb(K);for(int64_t i=0;i<K;++i){uint32_t u;memcpy(&u,&x[i],4);xb[i]=u>>16;}
  std::vector<float> yb(2*N);
  int64_t Nb=2*N;
  std::vector<std::pair<std::string,std::function<void()>>> v={
   {"read256",[&]{sink=readsum256(W.data(),N*K);}},
   {"read512",[&]{sink=readsum512(W.data(),N*K);}},
   {"f32 avx2 dot4",[&]{int64_t q=N/4;for(int64_t g=0;g<q;++g)dot4_f32_avx2(W.data()+g*K,K,q,x.data(),y.data()+g);}},
   {"f32 512 dot4",[&]{int64_t q=N/4;for(int64_t g=0;g<q;++g)dot4_f32_512(W.data()+g*K,K,q,x.data(),y.data()+g);}},
   {"f32 512 dot4 pf256",[&]{int64_t q=N/4;for(int64_t g=0;g<q;++g)dot4_f32_512pf<256>(W.data()+g*K,K,q,x.data(),y.data()+g);}},
   {"f32 512 dot4 pf1024",[&]{int64_t q=N/4;for(int64_t g=0;g<q;++g)dot4_f32_512pf<1024>(W.data()+g*K,K,q,x.data(),y.data()+g);}},
   {"f32 avx2 dot4 pf512",[&]{int64_t q=N/4;for(int64_t g=0;g<q;++g)dot4_f32_avx2pf<512>(W.data()+g*K,K,q,x.data(),y.data()+g);}},
   {"f32 512 dot1",[&]{for(int64_t n=0;n<N;++n)y[n]=dot1_512(W.data()+n*K,K,x.data());}},
   {"bf16 avx2 dot4",[&]{int64_t q=Nb/4;for(int64_t g=0;g<q;++g)dot4_bf16_avx2(Wb.data()+g*K,K,q,xe.data(),xo.data(),yb.data()+g);}},
   {"bf16 512 dot4",[&]{int64_t q=Nb/4;for(int64_t g=0;g<q;++g)dot4_bf16_512(Wb.data()+g*K,K,q,xe.data(),xo.data(),yb.data()+g);}},
   {"bf16 dpbf16 dot4",[&]{int64_t q=Nb/4;for(int64_t g=0;g<q;++g)dot4_bf16_dp(Wb.data()+g*K,K,q,xb.data(),yb.data()+g);}},
  };
  int R=atoi(argv[2]); std::vector<std::vector<double>> t(v.size());
  for(auto&f:v)f.second();
  for(int r=0;r<R;++r){for(size_t i0=0;i0<v.size();++i0){size_t i=r%2?v.size()-1-i0:i0;double s=tcpu();v[i].second();t[i].push_back(tcpu()-s);}}
  for(size_t i=0;i<v.size();++i){std::sort(t[i].begin(),t[i].end());double med=t[i][t[i].size()/2];printf("K=%ld %-18s %.1f GB/s (best %.1f)\n",(long)K,v[i].first.c_str(),total/med/1e9,total/t[i][0]/1e9);}
}
