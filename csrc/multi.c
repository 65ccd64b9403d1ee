/* Multi-tensor drivers: one call, and one OpenMP region a pass, over the
 * chunks of many tensors. A model has tens to hundreds of quantized
 * parameters, most of them small: a driver per tensor pays its fixed cost
 * (a call, a parallel region) per tensor and runs a small tensor on one
 * thread. Here the chunks of all tensors form one table that the threads
 * share, so a model of many small tensors costs about what one tensor of
 * the same total size costs.
 *
 * Each tensor is cut into the same DQ_CHUNK chunks as the single-tensor
 * drivers, and per-tensor reductions add the chunks' parts in chunk order,
 * so every output is bit-identical to the single-tensor driver's. */
#include <stddef.h>
#include <stdlib.h>

#include "dq_internal.h"

/* The chunk table of many tensors: chunk c is elements [start[c],
 * start[c] + len[c]) of tensor job[c]. */
typedef struct {
    int64_t total;
    int64_t values; /* of all tensors */
    int64_t *job, *start, *len;
} chunk_table;

static void table_free(chunk_table *t) {
    free(t->job);
    t->job = t->start = t->len = NULL;
}

/* The table of jobs cut into chunks of chunk_of[j] values (DQ_CHUNK for
 * every job when chunk_of is NULL); a job whose chunk_of is 0 is left out. */
static int table_make_chunked(const int64_t *sizes, const int64_t *chunk_of, int64_t njobs,
                              chunk_table *t) {
    int64_t total = 0, values = 0;
    for (int64_t j = 0; j < njobs; ++j) {
        const int64_t chunk = chunk_of ? chunk_of[j] : DQ_CHUNK;
        if (chunk > 0) {
            total += dq_num_chunks(sizes[j], chunk);
            values += sizes[j];
        }
    }
    t->total = total;
    t->values = values;
    t->job = malloc((size_t)(total ? total : 1) * 3 * sizeof(int64_t));
    if (!t->job)
        return DQ_ERR_NOMEM;
    t->start = t->job + total;
    t->len = t->start + total;
    int64_t c = 0;
    for (int64_t j = 0; j < njobs; ++j) {
        const int64_t chunk = chunk_of ? chunk_of[j] : DQ_CHUNK;
        for (int64_t s = 0; chunk > 0 && s < sizes[j]; s += chunk, ++c) {
            t->job[c] = j;
            t->start[c] = s;
            t->len[c] = DQ_MIN(chunk, sizes[j] - s);
        }
    }
    return DQ_OK;
}

static int table_make(const int64_t *sizes, int64_t njobs, chunk_table *t) {
    return table_make_chunked(sizes, NULL, njobs, t);
}

/* The size statistics of no logits, and a chunk's part added to them: the
 * drivers add their chunks' parts in chunk order, so they give the same
 * bits whichever pass computed the parts. */
static void size_stats_clear(dq_size_stats *o) {
    o->sum_bits = 0;
    o->max_bits = -INFINITY;
}

static void size_stats_add(dq_size_stats *o, const dq_size_stats *part) {
    o->sum_bits += part->sum_bits;
    o->max_bits = part->max_bits > o->max_bits ? part->max_bits : o->max_bits;
}

/* Threads for a pass over `values` values in all: one below a chunk's
 * worth. There the work takes tens of microseconds, less than the wake-up
 * and barriers of a parallel region, and on a loaded machine a region
 * waits for a time slice whenever another thread's core is taken (a model
 * of 200 small tensors measured a median 20 times its best). Results do
 * not depend on it: reductions go chunk by chunk in a fixed order. */
static int threads_for(int64_t values, int nthreads) {
    return values < DQ_CHUNK ? 1 : nthreads;
}

uint64_t dq_derive_seed(uint64_t base, int64_t index) {
    /* splitmix64 of base + golden-ratio increments: well-mixed, independent
     * seeds for the tensors of one forward */
    uint64_t z = base + 0x9E3779B97F4A7C15ull * (uint64_t)(index + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Extrema and non-finite count of each tensor ps[j]; part holds one range
 * per chunk, combined in chunk order. */
static void ranges_of(const chunk_table *t, const float *const *ps, int64_t njobs,
                      dq_range *part, dq_range *out, int nthreads) {
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (t->total > 1)
    for (int64_t c = 0; c < t->total; ++c)
        dq_range_fast(ps[t->job[c]], t->start[c], t->len[c], &part[c]);
    for (int64_t j = 0; j < njobs; ++j)
        dq__range_clear(&out[j]);
    for (int64_t c = 0; c < t->total; ++c)
        dq__range_add(&out[t->job[c]], &part[c]);
}

/* Scratch of a multi-tensor pass: the chunk table, a range per chunk and
 * per tensor, the tensors' pointers and sizes. */
typedef struct {
    chunk_table table;
    dq_range *part, *ranges;
    const float **ps;
    int64_t *ns;
    int nthreads; /* threads_for the tensors' values */
} multi_scratch;

static void scratch_free(multi_scratch *s) {
    table_free(&s->table);
    free(s->part);
    free(s->ranges);
    free(s->ps);
    free(s->ns);
}

/* Fills s for the tensors ps/ns already set; DQ_OK or DQ_ERR_NOMEM. */
static int scratch_make(multi_scratch *s, int64_t njobs) {
    if (!s->ps || !s->ns || table_make(s->ns, njobs, &s->table))
        return DQ_ERR_NOMEM;
    s->part = malloc((size_t)(s->table.total ? s->table.total : 1) * sizeof(dq_range));
    s->ranges = malloc((size_t)(njobs ? njobs : 1) * sizeof(dq_range));
    return s->part && s->ranges ? DQ_OK : DQ_ERR_NOMEM;
}

static int scratch_alloc_arrays(multi_scratch *s, int64_t njobs) {
    memset(s, 0, sizeof *s);
    s->ps = calloc((size_t)(njobs ? njobs : 1), sizeof(float *));
    s->ns = calloc((size_t)(njobs ? njobs : 1), sizeof(int64_t));
    return s->ps && s->ns ? DQ_OK : DQ_ERR_NOMEM;
}

/* s for njobs jobs of job_size bytes, each holding its tensor's pointer
 * (const float *) at p_offset and its size (int64_t) at n_offset, with the
 * tensors' ranges computed (s->ranges) on s->nthreads, the threads the pass
 * over them takes. Frees what it made on failure. */
static int scratch_with_ranges(multi_scratch *s, const void *jobs, size_t job_size, size_t p_offset,
                               size_t n_offset, int64_t njobs, int nthreads) {
    int err = scratch_alloc_arrays(s, njobs);
    for (int64_t j = 0; j < njobs && !err; ++j) {
        const char *job = (const char *)jobs + (size_t)j * job_size;
        memcpy(&s->ps[j], job + p_offset, sizeof s->ps[j]);
        memcpy(&s->ns[j], job + n_offset, sizeof s->ns[j]);
    }
    if (!err)
        err = scratch_make(s, njobs);
    if (err) {
        scratch_free(s);
        return err;
    }
    s->nthreads = threads_for(s->table.values, nthreads);
    ranges_of(&s->table, s->ps, njobs, s->part, s->ranges, s->nthreads);
    return DQ_OK;
}

/* Whether the noise forward gives job's size (see dq_noise_forward_multi). */
static int size_with_noise(const dq_noise_job *job) {
    return job->with_size && job->n > 0 && (job->group_size == 1 || job->n == 1);
}

/* Whether job's size takes a pass of its own (size_apart). */
static int size_without_noise(const dq_noise_job *job) { return job->with_size && !size_with_noise(job); }

/* The size of every job with_size that the noise forward does not give. */
static int size_apart(const dq_bits_param *prm, dq_noise_job *jobs, int64_t njobs, int nthreads) {
    const float **logits = malloc((size_t)njobs * sizeof(float *));
    /* calloc: at -O1 under UBSan GCC cannot bound the entries read to the m
     * written and warns of uninitialized ones */
    int64_t *ns = calloc((size_t)(njobs ? njobs : 1), sizeof(int64_t));
    dq_size_stats *out = malloc((size_t)njobs * sizeof(dq_size_stats));
    int64_t m = 0;
    int err = logits && ns && out ? DQ_OK : DQ_ERR_NOMEM;
    for (int64_t j = 0; j < njobs && !err; ++j)
        if (size_without_noise(&jobs[j])) {
            const int64_t gs = jobs[j].group_size;
            logits[m] = jobs[j].logit;
            ns[m++] = gs > 0 ? jobs[j].n / gs : 1;
        }
    if (!err)
        err = dq_size_forward_multi(prm, logits, ns, m, out, nthreads);
    for (int64_t j = 0, k = 0; j < njobs && !err; ++j)
        if (size_without_noise(&jobs[j]))
            jobs[j].size = out[k++];
    free(logits);
    free(ns);
    free(out);
    return err;
}

int dq_noise_forward_multi(const dq_bits_param *prm, int kind, dq_noise_job *jobs, int64_t njobs,
                           int nthreads) {
    multi_scratch s;
    int err = scratch_with_ranges(&s, jobs, sizeof *jobs, offsetof(dq_noise_job, p), offsetof(dq_noise_job, n),
                                  njobs, nthreads);
    if (err)
        return err;
    nthreads = s.nthreads;
    const chunk_table *t = &s.table;
    dq_range *part = s.part;
    int64_t bad = 0;
    for (int64_t j = 0; j < njobs; ++j) {
        jobs[j].range = s.ranges[j];
        bad += s.ranges[j].nonfinite;
    }
    if (bad) {
        scratch_free(&s);
        return DQ_ERR_NONFINITE;
    }
    /* the size of a tensor at group_size 1 from its noise chunks (its
     * logits' chunks are the same), a part a chunk added in chunk order as
     * dq_size_forward_multi adds them; of the others in a pass of their own */
    dq_size_stats *size_part = NULL;
    int64_t apart = 0;
    for (int64_t j = 0; j < njobs; ++j)
        if (size_without_noise(&jobs[j]))
            ++apart;
    if (apart < njobs) {
        size_part = malloc((size_t)(t->total ? t->total : 1) * sizeof(dq_size_stats));
        if (!size_part) {
            scratch_free(&s);
            return DQ_ERR_NOMEM;
        }
    }
    (void)nthreads;
    /* a chunk at a time: one is tens of microseconds of work, and taking
     * four left the threads up to four apart at the end (the forward over
     * the conv benchmark's tensors 8-12% slower) */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (t->total > 1)
    for (int64_t c = 0; c < t->total; ++c) {
        const dq_noise_job *job = &jobs[t->job[c]];
        const int64_t gs = dq__group_size_of(job->group_size, job->n);
        const float mn = job->range.min, mx = job->range.max;
        int64_t cmin = 0, cmax = 0;
        /* ties only where the chunk's own extremum is the tensor's */
        dq_noise_forward_fused(prm, job->p, job->logit, mx - mn, gs, kind, job->seed, t->start[c],
                               t->len[c], job->noisy, mn, mx, part[c].min == mn ? &cmin : NULL,
                               part[c].max == mx ? &cmax : NULL,
                               size_with_noise(job) ? &size_part[c] : NULL);
        part[c].count_min = cmin;
        part[c].count_max = cmax;
    }
    if (apart)
        err = size_apart(prm, jobs, njobs, nthreads);
    for (int64_t j = 0; j < njobs; ++j)
        if (size_with_noise(&jobs[j]))
            size_stats_clear(&jobs[j].size);
    for (int64_t c = 0; c < t->total; ++c)
        if (size_with_noise(&jobs[t->job[c]]))
            size_stats_add(&jobs[t->job[c]].size, &size_part[c]);
    free(size_part);
    /* ties at each end, and the first chunk holding each (as -2 - its
     * start): the backward then updates the extrema without a pass over p */
    for (int64_t c = 0; c < t->total; ++c) {
        dq_range *r = &jobs[t->job[c]].range;
        r->count_min += part[c].count_min;
        r->count_max += part[c].count_max;
        if (part[c].count_min && r->first_min == -1)
            r->first_min = -2 - t->start[c];
        if (part[c].count_max && r->first_max == -1)
            r->first_max = -2 - t->start[c];
    }
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (njobs > 1)
    for (int64_t j = 0; j < njobs; ++j) {
        dq_noise_job *job = &jobs[j];
        dq_range *r = &job->range;
        if (r->first_min <= -2) {
            int64_t from = -2 - r->first_min;
            r->first_min = dq__first_index(job->p, from, DQ_MIN(job->n, from + DQ_CHUNK), r->min);
        }
        if (r->first_max <= -2) {
            int64_t from = -2 - r->first_max;
            r->first_max = dq__first_index(job->p, from, DQ_MIN(job->n, from + DQ_CHUNK), r->max);
        }
    }
    scratch_free(&s);
    return err;
}

int dq_size_forward_multi(const dq_bits_param *prm, const float *const *logits, const int64_t *ns,
                          int64_t njobs, dq_size_stats *out, int nthreads) {
    chunk_table t;
    if (table_make(ns, njobs, &t))
        return DQ_ERR_NOMEM;
    nthreads = threads_for(t.values, nthreads);
    dq_size_stats *part = malloc((size_t)(t.total ? t.total : 1) * sizeof(dq_size_stats));
    if (!part) {
        table_free(&t);
        return DQ_ERR_NOMEM;
    }
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (t.total > 1)
    for (int64_t c = 0; c < t.total; ++c) {
        int64_t j = t.job[c];
        dq_size_forward_fast(prm, logits[j], t.start[c], t.len[c], &part[c]);
    }
    for (int64_t j = 0; j < njobs; ++j)
        size_stats_clear(&out[j]);
    for (int64_t c = 0; c < t.total; ++c)
        size_stats_add(&out[t.job[c]], &part[c]);
    free(part);
    table_free(&t);
    return DQ_OK;
}

int dq_size_backward_multi(const dq_bits_param *prm, const float *const *logits, const int64_t *ns,
                           const float *scales, float *const *grads, int64_t njobs, int nthreads) {
    chunk_table t;
    if (table_make(ns, njobs, &t))
        return DQ_ERR_NOMEM;
    nthreads = threads_for(t.values, nthreads);
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (t.total > 1)
    for (int64_t c = 0; c < t.total; ++c) {
        int64_t j = t.job[c];
        dq_size_backward_fast(prm, logits[j], t.start[c], t.len[c], scales[j], grads[j]);
    }
    table_free(&t);
    return DQ_OK;
}

int dq_quantize_prepare_multi(float min_bits, float max_bits, float extra_bits, dq_quant_job *jobs,
                              int64_t njobs, int nthreads) {
    multi_scratch s;
    int err = scratch_with_ranges(&s, jobs, sizeof *jobs, offsetof(dq_quant_job, p), offsetof(dq_quant_job, n),
                                  njobs, nthreads);
    if (err)
        return err;
    nthreads = s.nthreads;
    const chunk_table *t = &s.table;
    /* each group's stored bits in the chunk holding its first value, so a
     * group is computed once whatever the group size */
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (t->total > 1)
    for (int64_t c = 0; c < t->total; ++c) {
        const dq_quant_job *job = &jobs[t->job[c]];
        const int64_t gs = dq__group_size_of(job->group_size, job->n);
        const int64_t g0 = (t->start[c] + gs - 1) / gs, g1 = (t->start[c] + t->len[c] + gs - 1) / gs;
        if (g1 > g0)
            dq_stored_bits_fast(job->t, g0, g1 - g0, min_bits, max_bits, extra_bits, job->bits);
    }
    for (int64_t j = 0; j < njobs; ++j) {
        dq_quant_job *job = &jobs[j];
        const int64_t ngroups = job->group_size > 0 ? job->n / job->group_size : (job->n > 0);
        int64_t nan_bits = 0;
        for (int64_t g = 0; g < ngroups; ++g)
            nan_bits += job->bits[g] == 0;
        job->nan_bits = nan_bits;
        job->min = s.ranges[j].min;
        job->max = s.ranges[j].max;
        job->nonfinite = s.ranges[j].nonfinite;
    }
    scratch_free(&s);
    return DQ_OK;
}

int dq_requantize_multi(const dq_quant_job *jobs, int64_t njobs, int nthreads) {
    int64_t *ns = malloc((size_t)(njobs ? njobs : 1) * sizeof(int64_t));
    chunk_table t = {0};
    if (!ns)
        return DQ_ERR_NOMEM;
    for (int64_t j = 0; j < njobs; ++j)
        ns[j] = jobs[j].out ? jobs[j].n : 0;
    int err = table_make(ns, njobs, &t);
    free(ns);
    if (err)
        return err;
    nthreads = threads_for(t.values, nthreads);
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (t.total > 1)
    for (int64_t c = 0; c < t.total; ++c) {
        const dq_quant_job *job = &jobs[t.job[c]];
        const int64_t gs = dq__group_size_of(job->group_size, job->n);
        /* the range as the single-tensor path computes it: in double, rounded once */
        const float range = (float)((double)job->max - (double)job->min);
        dq_requantize_fast(job->p, gs, job->bits, job->min, range, t.start[c], t.len[c], job->out);
    }
    table_free(&t);
    return DQ_OK;
}

/* The gradient of one job: the noise's (unless grad is NULL), then the
 * size penalty's term. An empty tensor's logit gets no noise gradient. */
static int noise_grad_one(const dq_bits_param *prm, int kind, const dq_noise_grad_job *job, int nthreads) {
    if (job->grad && job->n > 0)
        /* the size term in the noise's chunks */
        return dq_noise_backward_sized(prm, job->grad, job->p, job->n, job->logit, job->group_size, kind,
                                       job->seed, &job->range, job->grad_p, job->grad_logit,
                                       job->add_size ? &job->size_scale : NULL, nthreads);
    if (job->grad)
        memset(job->grad_logit, 0, (size_t)job->nlogits * sizeof(float));
    if (!job->add_size)
        return DQ_OK;
    int64_t chunks = dq_num_chunks(job->nlogits, DQ_CHUNK);
    (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (chunks > 1 && nthreads > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t start = c * DQ_CHUNK, len = DQ_MIN(DQ_CHUNK, job->nlogits - start);
        if (job->grad)
            dq_size_backward_add_fast(prm, job->logit, start, len, job->size_scale, job->grad_logit);
        else
            dq_size_backward_fast(prm, job->logit, start, len, job->size_scale, job->grad_logit);
    }
    return DQ_OK;
}

/* Whether a job's noise gradient goes through the shared chunk table (a
 * gradient, values, groups no larger than a chunk), not noise_grad_one. */
static int grad_in_table(const dq_noise_grad_job *job) {
    const int64_t gs = dq__group_size_of(job->group_size, job->n);
    return job->grad && job->n > 0 && gs <= DQ_CHUNK;
}

/* The noise backward of the table's jobs: the chunks of all of them (whole
 * groups each, as dq_noise_backward cuts them) shared by the threads a
 * chunk at a time, then each job's gradient through its extrema from its
 * chunks' sums added in chunk order, as dq_noise_backward adds them: the
 * same bits. A job whose grad_p is not its grad gets grad copied in its
 * chunks, so only the extrema are left to write. */
static int backward_table(const dq_bits_param *prm, int kind, const dq_noise_grad_job *jobs,
                          int64_t njobs, int nthreads) {
    int64_t *sizes = malloc((size_t)(njobs ? njobs : 1) * 2 * sizeof(int64_t));
    if (!sizes)
        return DQ_ERR_NOMEM;
    int64_t *chunk_of = sizes + njobs;
    for (int64_t j = 0; j < njobs; ++j) {
        sizes[j] = jobs[j].n;
        const int64_t gs = dq__group_size_of(jobs[j].group_size, jobs[j].n);
        chunk_of[j] = grad_in_table(&jobs[j]) ? dq__grad_chunk(gs) : 0;
    }
    chunk_table t;
    int err = table_make_chunked(sizes, chunk_of, njobs, &t);
    free(sizes);
    if (err)
        return err;
    double *part = t.total ? malloc((size_t)t.total * sizeof(double)) : NULL;
    if (t.total && !part) {
        table_free(&t);
        return DQ_ERR_NOMEM;
    }
    (void)nthreads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (t.total > 1)
    for (int64_t k = 0; k < t.total; ++k) {
        const dq_noise_grad_job *job = &jobs[t.job[k]];
        const int64_t gs = dq__group_size_of(job->group_size, job->n);
        part[k] = dq_noise_backward_fused(prm, job->grad, job->logit, job->range.max - job->range.min, gs, kind,
                                          job->seed, t.start[k], t.len[k], job->grad_logit,
                                          job->add_size ? &job->size_scale : NULL);
        if (job->grad_p != job->grad)
            memcpy(job->grad_p + t.start[k], job->grad + t.start[k], (size_t)t.len[k] * sizeof(float));
    }
    for (int64_t j = 0, k = 0; j < njobs; ++j) {
        if (!grad_in_table(&jobs[j]))
            continue;
        double through_scale = 0;
        for (; k < t.total && t.job[k] == j; ++k)
            through_scale += part[k];
        const dq_noise_grad_job *job = &jobs[j];
        dq__add_extrema_grad(job->grad, job->p, job->n, &job->range, through_scale, job->grad_p, 1,
                             nthreads);
    }
    free(part);
    table_free(&t);
    return DQ_OK;
}

int dq_noise_backward_multi(const dq_bits_param *prm, int kind, const dq_noise_grad_job *jobs,
                            int64_t njobs, int nthreads) {
    int64_t values = 0;
    for (int64_t j = 0; j < njobs; ++j)
        values += jobs[j].n + jobs[j].nlogits;
    nthreads = threads_for(values, nthreads);
    int err = backward_table(prm, kind, jobs, njobs, nthreads);
    /* the rest (the size term alone, empty tensors, groups over a chunk):
     * small ones one a thread, each on one thread; large ones after, each
     * with every thread */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (njobs > 1) reduction(min : err)
    for (int64_t j = 0; j < njobs; ++j) {
        if (grad_in_table(&jobs[j]) || jobs[j].n > DQ_CHUNK || jobs[j].nlogits > DQ_CHUNK)
            continue;
        int e = noise_grad_one(prm, kind, &jobs[j], 1);
        err = e < err ? e : err;
    }
    for (int64_t j = 0; j < njobs && err == DQ_OK; ++j)
        if (!grad_in_table(&jobs[j]) && (jobs[j].n > DQ_CHUNK || jobs[j].nlogits > DQ_CHUNK))
            err = noise_grad_one(prm, kind, &jobs[j], nthreads);
    return err;
}
