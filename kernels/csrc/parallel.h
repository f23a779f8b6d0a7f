// Work sharing on torch's thread pool with a shared counter: each thread claims the next chunk of items when it
// is done with the last, instead of at::parallel_for's fixed equal ranges. The two cores of a small shared VM
// often run at different speeds; a fixed split makes the faster one wait at the end of every call.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace dfqvit {

// body(claim) runs once per thread (per-thread scratch goes before its loop); claim(&begin, &end) hands out
// [begin, end) ranges of up to `chunk` of the `total` items and returns false when none is left.
template <typename Body>
void parallel_claims(int64_t total, int64_t chunk, const Body& body) {
  std::atomic<int64_t> next{0};
  auto claim = [&](int64_t* begin, int64_t* end) {
    *begin = next.fetch_add(chunk);
    if (*begin >= total) return false;
    *end = std::min(total, *begin + chunk);
    return true;
  };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { body(claim); });
}

}  // namespace dfqvit
