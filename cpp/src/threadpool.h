// A small persistent thread pool. Our own, so that the runtime never fights an OpenMP runtime
// that another extension (torch, numpy's BLAS) loaded into the same Python process.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

namespace ps {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);  // n_threads >= 1; the calling thread is worker 0
    ~ThreadPool();
    ThreadPool(const ThreadPool&) = delete;
    ThreadPool& operator=(const ThreadPool&) = delete;

    int size() const;

    // Runs fn(task, thread) for task in [0, n_tasks), tasks handed out dynamically, and returns
    // when all are done. Which thread runs a task must never change a result: callers make each
    // task write its own output.
    void parallel_for(int64_t n_tasks, const std::function<void(int64_t task, int thread)>& fn);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace ps
