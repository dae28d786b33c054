/* Fused CPU kernels for compile's two passes over every weight (see fxprune/native/__init__.py).

   magnitude_sums: per row and/or per column of a contiguous [n, k, inner] tensor, the sum of |x| (or x*x)
   over everything else, in one read of the tensor. torch needs three (|w| into scratch, then one
   reduction per dim).
   cut: out[i, j, :] = src[rows[i], cols[j], :] in one pass. torch needs two (the kept rows gathered into
   scratch, then their kept columns).

   Work is split into blocks of whole rows whose size depends on the tensor's shape only, and column sums
   add the blocks' partial sums in block order after every thread is done, so results do not depend on the
   number of threads. Sums within a block are in float (double for float64 weights), across blocks in double. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FLOAT32 0
#define FLOAT64 1
#define BFLOAT16 2
#define FLOAT16 3

typedef struct {
    const void *data;      /* contiguous [n, k, inner] */
    int64_t n, k, inner;
    int32_t dtype;         /* FLOAT32, FLOAT64, BFLOAT16 or FLOAT16 */
    int32_t power;         /* 1: |x|, 2: x * x */
    double *rows;          /* [n] sums over (k, inner), or NULL */
    double *cols;          /* [k] sums over (n, inner), or NULL */
    void *partial;         /* [blocks, k] per-block column sums (double for FLOAT64, else float), when cols is set */
    int64_t block_rows;
} sum_job;

typedef struct {
    const char *src;       /* contiguous [n, k, inner] of elem-byte values */
    char *dst;             /* contiguous [n_rows, n_cols, inner] */
    int64_t k, inner, elem;
    const int64_t *rows;   /* kept rows, or NULL for every row (n_rows of them) */
    int64_t n_rows;
    const int64_t *cols;   /* kept columns, or NULL for every column */
    int64_t n_cols;
    int64_t block_rows;
} cut_job;

typedef struct { int64_t job, begin, end, block; } work_item;

typedef struct {
    const void *jobs;
    const work_item *items;
    int64_t n_items;
    int64_t next;          /* the next item to take, shared by the threads */
    void (*run)(const void *jobs, const work_item *item);
} work_queue;

static void *worker(void *arg) {
    work_queue *queue = (work_queue *)arg;
    for (;;) {
        int64_t i = __atomic_fetch_add(&queue->next, 1, __ATOMIC_RELAXED);
        if (i >= queue->n_items)
            return NULL;
        queue->run(queue->jobs, &queue->items[i]);
    }
}

/* Runs every item on n_threads threads (the caller's included); a thread that cannot be started leaves
   its share to the others. */
static void run_items(work_queue *queue, int n_threads) {
    pthread_t threads[64];
    int started = 0;
    if (n_threads > 64)
        n_threads = 64;
    for (int t = 1; t < n_threads && t < queue->n_items; ++t)
        if (pthread_create(&threads[started], NULL, worker, queue) == 0)
            ++started;
    worker(queue);
    for (int t = 0; t < started; ++t)
        pthread_join(threads[t], NULL);
}

/* A job's rows and the rows of each of its blocks. */
typedef void (*job_shape)(const void *jobs, int64_t job, int64_t *rows, int64_t *block_rows);

/* Every job cut into blocks of rows, run on n_threads threads. Returns 0, or -1 when out of memory (nothing
   is written then). */
static int run_blocks(const void *jobs, int64_t n_jobs, job_shape shape,
                      void (*run)(const void *jobs, const work_item *item), int n_threads) {
    int64_t total = 0, rows, block_rows;
    for (int64_t j = 0; j < n_jobs; ++j) {
        shape(jobs, j, &rows, &block_rows);
        total += (rows + block_rows - 1) / block_rows;
    }
    work_item *items = (work_item *)malloc(sizeof(work_item) * (size_t)(total > 0 ? total : 1));
    if (!items)
        return -1;
    int64_t i = 0;
    for (int64_t j = 0; j < n_jobs; ++j) {
        shape(jobs, j, &rows, &block_rows);
        for (int64_t b = 0, begin = 0; begin < rows; ++b, begin += block_rows) {
            int64_t end = begin + block_rows;
            items[i].job = j;
            items[i].begin = begin;
            items[i].end = end < rows ? end : rows;
            items[i].block = b;
            ++i;
        }
    }
    work_queue queue = {jobs, items, total, 0, run};
    run_items(&queue, n_threads);
    free(items);
    return 0;
}

/* 16-bit floats widened to float: bfloat16 is float's upper half; IEEE half needs its exponent rebased. */
static inline float from_bfloat16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Without branches, so that loops over it vectorise: the exponent and mantissa moved to float's places,
   then scaled by 2^112 to rebase the exponent (15 -> 127; this makes subnormals right too); all-ones
   exponents (infinity, NaN) set apart. */
static inline float from_float16(uint16_t h) {
    uint32_t shifted = (uint32_t)(h & 0x7fffu) << 13, bits;
    float f;
    memcpy(&f, &shifted, sizeof f);
    f *= 0x1p112f;
    memcpy(&bits, &f, sizeof bits);
    bits = (h & 0x7c00u) == 0x7c00u ? 0x7f800000u | (shifted & 0x7fffffu) : bits;
    bits |= (uint32_t)(h & 0x8000u) << 16;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define AS_IS(x) (x)

/* |x| or x * x in the accumulator's type (float32 sums within a block are what torch's kernels do too) */
#define MAGNITUDE(x) (power == 1 ? (x < 0 ? -x : x) : x * x)

/* T: the weight's storage type, A: the type it is summed in, LOAD: T -> A */
#define SUM_ROWS(T, A, LOAD)                                                                                \
    {                                                                                                       \
        A *acc = job->cols ? (A *)job->partial + item->block * job->k : NULL;                               \
        if (acc)                                                                                            \
            memset(acc, 0, sizeof(A) * (size_t)job->k);                                                     \
        for (int64_t i = item->begin; i < item->end; ++i) {                                                 \
            const T *row = (const T *)job->data + i * width;                                                \
            A row_sum = 0;                                                                                  \
            if (acc && job->inner == 1) {                                                                   \
                _Pragma("omp simd reduction(+:row_sum)")                                                    \
                for (int64_t j = 0; j < width; ++j) {                                                       \
                    A x = LOAD(row[j]), m = MAGNITUDE(x);                                                   \
                    acc[j] += m;                                                                            \
                    row_sum += m;                                                                           \
                }                                                                                           \
            } else if (acc) {                                                                               \
                for (int64_t j = 0; j < job->k; ++j) {                                                      \
                    A s = 0;                                                                                \
                    _Pragma("omp simd reduction(+:s)")                                                      \
                    for (int64_t t = 0; t < job->inner; ++t) {                                              \
                        A x = LOAD(row[j * job->inner + t]);                                                \
                        s += MAGNITUDE(x);                                                                  \
                    }                                                                                       \
                    acc[j] += s;                                                                            \
                    row_sum += s;                                                                           \
                }                                                                                           \
            } else {                                                                                        \
                _Pragma("omp simd reduction(+:row_sum)")                                                    \
                for (int64_t j = 0; j < width; ++j) {                                                       \
                    A x = LOAD(row[j]);                                                                     \
                    row_sum += MAGNITUDE(x);                                                                \
                }                                                                                           \
            }                                                                                               \
            if (job->rows)                                                                                  \
                job->rows[i] = (double)row_sum;                                                             \
        }                                                                                                   \
    }

static void sum_block(const void *jobs, const work_item *item) {
    const sum_job *job = (const sum_job *)jobs + item->job;
    const int64_t width = job->k * job->inner;
    const int32_t power = job->power;
    switch (job->dtype) {
    case FLOAT32: SUM_ROWS(float, float, AS_IS) break;
    case FLOAT64: SUM_ROWS(double, double, AS_IS) break;
    case BFLOAT16: SUM_ROWS(uint16_t, float, from_bfloat16) break;
    default: SUM_ROWS(uint16_t, float, from_float16) break;
    }
}

/* The blocks' column sums, added in block order in double. */
#define ADD_BLOCKS(T)                                                                                       \
    for (int64_t b = 0; b < blocks; ++b)                                                                    \
        for (int64_t c = 0; c < job->k; ++c)                                                                \
            job->cols[c] += (double)((const T *)job->partial)[b * job->k + c];

static void sum_shape(const void *jobs, int64_t j, int64_t *rows, int64_t *block_rows) {
    *rows = ((const sum_job *)jobs)[j].n;
    *block_rows = ((const sum_job *)jobs)[j].block_rows;
}

/* Returns 0, or -1 when out of memory (nothing is written then). */
int fxprune_magnitude_sums(sum_job *jobs, int64_t n_jobs, int n_threads) {
    if (run_blocks(jobs, n_jobs, sum_shape, sum_block, n_threads) != 0)
        return -1;
    for (int64_t j = 0; j < n_jobs; ++j) {   /* the blocks' column sums, in block order */
        const sum_job *job = &jobs[j];
        if (!job->cols)
            continue;
        int64_t blocks = (job->n + job->block_rows - 1) / job->block_rows;
        memset(job->cols, 0, sizeof(double) * (size_t)job->k);
        if (job->dtype == FLOAT64)
            ADD_BLOCKS(double)
        else
            ADD_BLOCKS(float)
    }
    return 0;
}

#define GATHER(T)                                                                                           \
    {                                                                                                       \
        const T *restrict s = (const T *)src;                                                               \
        T *restrict d = (T *)dst;                                                                           \
        for (int64_t j = 0; j < n_cols; ++j)                                                                \
            d[j] = s[cols[j]];                                                                              \
    }

static void cut_block(const void *jobs, const work_item *item) {
    const cut_job *job = (const cut_job *)jobs + item->job;
    const int64_t bytes = job->inner * job->elem;                     /* one (row, column) entry */
    const int64_t out_row = (job->cols ? job->n_cols : job->k) * bytes;
    const int64_t n_cols = job->n_cols, *restrict cols = job->cols;   /* locals: the loops then vectorise */
    for (int64_t i = item->begin; i < item->end; ++i) {
        const char *src = job->src + (job->rows ? job->rows[i] : i) * job->k * bytes;
        char *dst = job->dst + i * out_row;
        if (!job->cols) {
            memcpy(dst, src, (size_t)out_row);
        } else if (job->inner == 1 && job->elem == 4) {
            GATHER(uint32_t)
        } else if (job->inner == 1 && job->elem == 8) {
            GATHER(uint64_t)
        } else if (job->inner == 1 && job->elem == 2) {
            GATHER(uint16_t)
        } else if (job->inner == 1 && job->elem == 1) {
            GATHER(uint8_t)
        } else {
            for (int64_t j = 0; j < job->n_cols; ++j)
                memcpy(dst + j * bytes, src + job->cols[j] * bytes, (size_t)bytes);
        }
    }
}

static void cut_shape(const void *jobs, int64_t j, int64_t *rows, int64_t *block_rows) {
    *rows = ((const cut_job *)jobs)[j].n_rows;
    *block_rows = ((const cut_job *)jobs)[j].block_rows;
}

/* Returns 0, or -1 when out of memory (nothing is written then). */
int fxprune_cut(cut_job *jobs, int64_t n_jobs, int n_threads) {
    return run_blocks(jobs, n_jobs, cut_shape, cut_block, n_threads);
}
