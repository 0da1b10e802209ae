// A persistent pool: workers wait for a new generation of work, join the job if it is still open,
// take tasks from a shared atomic counter, and leave. A decode step calls parallel_for about ten
// times per layer, microseconds apart, so workers first spin (cheap hand-off) and only then sleep
// on a condition variable (no burned cores between requests). The caller is worker 0 and works
// too; once every task is claimed it closes the job and waits only for workers that joined it, so
// a worker that the OS has descheduled (other processes on the cores) never delays a call.
#include "threadpool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PS_PAUSE() _mm_pause()
#else
#define PS_PAUSE() std::this_thread::yield()
#endif

#include "common.h"

namespace ps {

namespace {
// How long an idle worker spins before sleeping. Covers the gap between the matrix products of
// one layer (norms, attention on one token) without holding a core through a whole sampling step.
constexpr auto kSpin = std::chrono::microseconds(200);
}  // namespace

struct ThreadPool::Impl {
    int n = 1;
    std::vector<std::thread> workers;

    std::mutex call_mu;  // one parallel_for at a time (a Model used from two Python threads)

    // The current job. Written by the caller before it publishes a new generation (release),
    // read by workers after they observe it (acquire).
    const std::function<void(int64_t, int)>* fn = nullptr;
    int64_t n_tasks = 0;
    std::atomic<int64_t> next{0};
    // Joining protocol (both sides seq_cst, Dekker-style): a worker increments `active`, then
    // reads `open`; the caller clears `open`, then waits for `active` to drain. Either the
    // caller sees the worker's increment and waits for it, or the worker sees the job closed and
    // touches nothing of it.
    std::atomic<bool> open{false};
    std::atomic<int> active{0};

    std::atomic<uint64_t> generation{0};
    std::atomic<bool> stop{false};
    std::mutex mu;  // guards sleeping workers' wait, n_sleeping, and the generation bump
    std::condition_variable cv;
    int n_sleeping = 0;

    std::mutex err_mu;
    std::exception_ptr error;

    void run_tasks(int thread) {
        for (;;) {
            const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
            if (t >= n_tasks) return;
            try {
                (*fn)(t, thread);
            } catch (...) {
                {
                    std::lock_guard<std::mutex> lk(err_mu);
                    if (!error) error = std::current_exception();
                }
                next.store(n_tasks, std::memory_order_relaxed);  // skip the remaining tasks
                return;
            }
        }
    }

    void worker_main(int thread) {
        uint64_t seen = 0;
        for (;;) {
            // Spin, then sleep, until a new generation (or stop) appears.
            uint64_t g = generation.load(std::memory_order_acquire);
            if (g == seen && !stop.load(std::memory_order_acquire)) {
                const auto until = std::chrono::steady_clock::now() + kSpin;
                int spins = 0;
                while ((g = generation.load(std::memory_order_acquire)) == seen &&
                       !stop.load(std::memory_order_acquire)) {
                    PS_PAUSE();
                    if (++spins % 64 == 0 && std::chrono::steady_clock::now() > until) {
                        std::unique_lock<std::mutex> lk(mu);
                        ++n_sleeping;
                        cv.wait(lk, [&] {
                            return generation.load(std::memory_order_acquire) != seen ||
                                   stop.load(std::memory_order_acquire);
                        });
                        --n_sleeping;
                        g = generation.load(std::memory_order_acquire);
                        break;
                    }
                }
            }
            if (stop.load(std::memory_order_acquire) && g == seen) return;
            seen = g;
            active.fetch_add(1, std::memory_order_seq_cst);
            if (open.load(std::memory_order_seq_cst)) run_tasks(thread);
            active.fetch_sub(1, std::memory_order_release);
        }
    }
};

ThreadPool::ThreadPool(int n_threads) : impl_(std::make_unique<Impl>()) {
    if (n_threads < 1) fail(strfmt("thread count must be at least 1, got %d", n_threads));
    impl_->n = n_threads;
    impl_->workers.reserve(size_t(n_threads - 1));
    try {
        for (int i = 1; i < n_threads; ++i) impl_->workers.emplace_back([this, i] { impl_->worker_main(i); });
    } catch (...) {
        // Thread creation failed part way: stop the ones that started before reporting.
        impl_->stop.store(true, std::memory_order_release);
        { std::lock_guard<std::mutex> lk(impl_->mu); }
        impl_->cv.notify_all();
        for (auto& t : impl_->workers) t.join();
        throw;
    }
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(impl_->mu);
        impl_->stop.store(true, std::memory_order_release);
    }
    impl_->cv.notify_all();
    for (auto& t : impl_->workers) t.join();
}

int ThreadPool::size() const { return impl_->n; }

void ThreadPool::parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int thread)>& fn) {
    if (n_tasks <= 0) return;
    Impl& p = *impl_;
    std::lock_guard<std::mutex> call_lock(p.call_mu);
    if (p.n == 1 || n_tasks == 1) {  // nothing to share: no hand-off cost
        for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
        return;
    }
    // No worker is inside a job here (the last call drained `active` after closing), so the
    // job's fields can be written; opening the job publishes them.
    p.fn = &fn;
    p.n_tasks = n_tasks;
    p.error = nullptr;
    p.next.store(0, std::memory_order_relaxed);
    p.open.store(true, std::memory_order_seq_cst);
    bool wake;
    {
        // Bumping the generation under the mutex means a worker about to sleep either sees the
        // new generation in its wait predicate or is already counted in n_sleeping.
        std::lock_guard<std::mutex> lk(p.mu);
        p.generation.fetch_add(1, std::memory_order_acq_rel);
        wake = p.n_sleeping > 0;
    }
    if (wake) p.cv.notify_all();

    p.run_tasks(0);
    // Every task is claimed. Close the job; workers that joined it must leave (finishing the
    // tasks they hold) before fn, the caller's object, goes out of scope.
    p.open.store(false, std::memory_order_seq_cst);
    int spins = 0;
    while (p.active.load(std::memory_order_acquire) != 0) {
        PS_PAUSE();
        if (++spins > 4096) std::this_thread::yield();  // its thread was descheduled mid-task
    }
    p.fn = nullptr;
    if (p.error) {
        std::exception_ptr e = p.error;
        p.error = nullptr;
        std::rethrow_exception(e);
    }
}

}  // namespace ps
