// Units of work shared between the calling thread and XLA's intra-op thread pool (the CPU kernels).

#ifndef LLMF_SHARE_H_
#define LLMF_SHARE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace llmf {

// Runs units 0 .. units-1, each once, on the caller and up to `helpers` pool threads, and returns when
// all are done. Units are claimed from an atomic counter. Each participant makes its own worker with
// make_worker() (a callable taking a unit index; it may hold per-thread scratch). The state is held by
// shared_ptr: a helper that starts after the call has returned finds no unit left, so it never runs a
// unit and touches nothing the caller owns.
template <typename MakeWorker>
void ShareUnits(xla::ffi::ThreadPool& pool, int64_t units, int64_t helpers, MakeWorker make_worker) {
  struct Shared {
    Shared(MakeWorker make, int64_t n) : make_worker(std::move(make)), units(n) {}
    MakeWorker make_worker;
    int64_t units;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};

    void Claim() {
      active.fetch_add(1);
      auto worker = make_worker();
      for (int64_t u; (u = next.fetch_add(1)) < units;) worker(u);
      active.fetch_sub(1);
    }
  };
  auto shared = std::make_shared<Shared>(std::move(make_worker), units);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Claim(); });
  shared->Claim();
  // Every unit is claimed; wait for helpers still computing theirs (a helper that starts now claims none).
  while (shared->active.load() != 0) {
  }
}

}  // namespace llmf

#endif  // LLMF_SHARE_H_
