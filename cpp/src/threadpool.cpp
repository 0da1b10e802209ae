// STUB (helper: kernels) - runs serially
#include "threadpool.h"
namespace ps {
struct ThreadPool::Impl { int n; };
ThreadPool::ThreadPool(int n) : impl_(new Impl{n < 1 ? 1 : n}) {}
ThreadPool::~ThreadPool() = default;
int ThreadPool::size() const { return impl_->n; }
void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int)>& fn) { for (int64_t i = 0; i < n; ++i) fn(i, 0); }
}
