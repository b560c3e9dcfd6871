/* One persistent thread pool for keenlm's kernels.
 *
 * A decode step runs a few hundred short pieces of work per token (tens of microseconds
 * each), so threads cannot be started per call and a wake-up through the kernel's scheduler
 * (a futex, ~5-50 us) costs as much as the work. The scheme is llama.cpp's: a job is one
 * function that every participating thread runs at once, with barriers inside it between the
 * dependent steps (``pool_barrier``: a spinning counter, well under a microsecond on 2 cores).
 *
 * Worker i waits on its own slot (a generation counter): it spins for a while after each job,
 * then sleeps on a condition variable, so an idle pool costs nothing. A job wakes only the
 * workers it uses: a pool grown to 4 threads by one call does not spin 4 threads on a 2-core
 * machine when the next job asks for 2.
 *
 * A forked child (DataLoader workers, multiprocessing) has none of the parent's workers: it
 * forgets them (pthread_atfork) and starts its own when it needs them. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "qdot.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#else
#define PAUSE() ((void)0)
#endif

#define SPIN 100000 /* pauses (~1-3 ms) a worker waits for the next job before it sleeps */

static struct {
    pool_fn fn;
    void *ctx;
    int nth;
    int park; /* 1: the workers sleep right after this job instead of spinning for the next */
} job;

static atomic_int slot[QDOT_MAX_THREADS]; /* generation of the last job posted to worker i */
static int start_seen[QDOT_MAX_THREADS];
static atomic_int done = 0, sleepers = 0;
static atomic_int bar_count = 0, bar_phase = 0;
static int pool_size = 0; /* workers started: ids 1 .. pool_size */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    int seen = start_seen[id];
    for (;;) {
        int gen, spins = 0;
        while ((gen = atomic_load(&slot[id])) == seen) {
            if (++spins < SPIN) {
                PAUSE();
                continue;
            }
            pthread_mutex_lock(&lock);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&slot[id]) == seen) pthread_cond_wait(&wake, &lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&lock);
            spins = 0;
        }
        seen = gen;
        const int park = job.park;
        job.fn(job.ctx, id, job.nth);
        atomic_fetch_add(&done, 1);
        if (park) { /* torch's own threads come next: do not spin beside them */
            pthread_mutex_lock(&lock);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&slot[id]) == seen) pthread_cond_wait(&wake, &lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&lock);
        }
    }
    return NULL;
}

static void forget_pool(void) {
    pool_size = 0;
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&lock, NULL);
    pthread_cond_init(&wake, NULL);
    pthread_mutex_init(&call_lock, NULL);
}

static int ensure_pool(int workers) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, forget_pool);
        registered = 1;
    }
    while (pool_size < workers && pool_size < QDOT_MAX_THREADS - 1) {
        const int id = pool_size + 1;
        pthread_t t;
        start_seen[id] = atomic_load(&slot[id]);
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)id) != 0) break;
        pthread_detach(t);
        pool_size = id;
    }
    return pool_size;
}

static void run(pool_fn fn, void *ctx, int nth, int park) {
    nth = nth < 1 ? 1 : nth > QDOT_MAX_THREADS ? QDOT_MAX_THREADS : nth;
    pthread_mutex_lock(&call_lock);
    if (nth > 1) {
        const int have = ensure_pool(nth - 1) + 1;
        nth = have < nth ? have : nth;
    }
    if (nth == 1) {
        fn(ctx, 0, 1);
        pthread_mutex_unlock(&call_lock);
        return;
    }
    job.fn = fn;
    job.ctx = ctx;
    job.nth = nth;
    job.park = park;
    atomic_store(&done, 0);
    for (int i = 1; i < nth; i++) atomic_fetch_add(&slot[i], 1);
    if (atomic_load(&sleepers) > 0) { /* under the lock: a worker going to sleep sees it */
        pthread_mutex_lock(&lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&lock);
    }
    fn(ctx, 0, nth);
    while (atomic_load(&done) < nth - 1) PAUSE();
    pthread_mutex_unlock(&call_lock);
}

void pool_run(pool_fn fn, void *ctx, int nth) { run(fn, ctx, nth, 0); }

void pool_run_once(pool_fn fn, void *ctx, int nth) { run(fn, ctx, nth, 1); }

void pool_barrier(int nth) {
    if (nth <= 1) return;
    const int phase = atomic_load(&bar_phase);
    if (atomic_fetch_add(&bar_count, 1) == nth - 1) {
        atomic_store(&bar_count, 0);
        atomic_fetch_add(&bar_phase, 1);
    } else {
        while (atomic_load(&bar_phase) == phase) PAUSE();
    }
}

void pool_share(int N, int ith, int nth, int *n0, int *n1) {
    const int groups = (N + 3) / 4;
    const int g0 = (int)((long)groups * ith / nth), g1 = (int)((long)groups * (ith + 1) / nth);
    *n0 = 4 * g0;
    *n1 = 4 * g1 < N ? 4 * g1 : N;
}
