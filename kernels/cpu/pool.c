/* A pool of persistent threads. Between tasks a worker spins a while on the task counter (a
 * decode step starts the next task within microseconds), then sleeps on a condition variable so
 * an idle server costs no CPU. One task at a time: pool_run holds a lock for its duration. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "cpu.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define RELAX() _mm_pause()
#elif defined(__aarch64__)
#define RELAX() __asm__ __volatile__("yield")
#else
#define RELAX() ((void)0)
#endif

#define SPINS 200000 /* relax loops before sleeping: ~10 ms */

static struct {
    int n; /* threads, the caller included */
    int start_generation; /* the generation workers were created at */
    pthread_t *threads;
    task_fn fn;
    void *ctx;
    atomic_int generation, pending, sleepers, stop;
    atomic_int barrier_count, barrier_phase;
    pthread_mutex_t mu, run_mu;
    pthread_cond_t cv;
} P = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .run_mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static _Thread_local int my_nth = 1;

static void *worker(void *arg) {
    int ith = (int)(intptr_t)arg, seen = P.start_generation; /* not now: a task may already be posted */
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&P.generation, memory_order_acquire) == seen && spins++ < SPINS) RELAX();
        if (atomic_load(&P.generation) == seen) {
            pthread_mutex_lock(&P.mu);
            atomic_fetch_add(&P.sleepers, 1);
            while (atomic_load(&P.generation) == seen) pthread_cond_wait(&P.cv, &P.mu);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.mu);
        }
        seen = atomic_load(&P.generation);
        if (atomic_load(&P.stop)) return NULL;
        my_nth = P.n;
        P.fn(P.ctx, ith, P.n);
        atomic_fetch_sub_explicit(&P.pending, 1, memory_order_release);
    }
}

static void wake_all(void) {
    atomic_fetch_add(&P.generation, 1);
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
}

int pool_threads(void) { return P.n; }

void pool_set_threads(int n) {
    if (n < 1) n = 1;
    pthread_mutex_lock(&P.run_mu);
    if (P.n > 1) { /* stop the old workers */
        atomic_store(&P.stop, 1);
        wake_all();
        for (int i = 1; i < P.n; i++) pthread_join(P.threads[i - 1], NULL);
        free(P.threads);
        P.threads = NULL;
        atomic_store(&P.stop, 0);
    }
    P.n = n;
    P.start_generation = atomic_load(&P.generation);
    if (n > 1) {
        P.threads = calloc((size_t)n - 1, sizeof(pthread_t));
        for (int i = 1; i < n; i++) pthread_create(&P.threads[i - 1], NULL, worker, (void *)(intptr_t)i);
    }
    pthread_mutex_unlock(&P.run_mu);
}

void pool_run(task_fn fn, void *ctx) {
    pthread_mutex_lock(&P.run_mu);
    P.fn = fn;
    P.ctx = ctx;
    atomic_store(&P.barrier_count, 0);
    atomic_store(&P.pending, P.n - 1);
    if (P.n > 1) wake_all();
    my_nth = P.n;
    fn(ctx, 0, P.n);
    for (int spins = 0; atomic_load_explicit(&P.pending, memory_order_acquire) > 0; spins++) {
        if (spins > SPINS) sched_yield();
        else RELAX();
    }
    pthread_mutex_unlock(&P.run_mu);
}

void pool_barrier(void) {
    int n = my_nth;
    if (n == 1) return;
    int phase = atomic_load_explicit(&P.barrier_phase, memory_order_acquire);
    if (atomic_fetch_add(&P.barrier_count, 1) == n - 1) {
        atomic_store(&P.barrier_count, 0);
        atomic_fetch_add_explicit(&P.barrier_phase, 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&P.barrier_phase, memory_order_acquire) == phase; spins++) {
        if (spins > 1000) sched_yield(); /* a shared machine: let the late thread run */
        else RELAX();
    }
}
