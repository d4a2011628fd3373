// The C++ Pool's part of benchmarks/bench_pool.py: no-op task throughput from 1 and 4 service
// threads (futures), as one Pool::map, from one thread with callbacks (async_submit), and
// sequential submit -> result latency. Prints one JSON object.
//
//   bench_pool_cpp SOURCE_DIR [--quick]
//   bench_pool_cpp SOURCE_DIR --paired
//
// --paired: for bench_pool.py's side-by-side comparison with the Executor. Prints "ready" once
// the pool is warm, then for each line read from stdin, "N" or "map N", runs N no-op tasks from
// 1 service thread (a future each, or one Pool::map) and prints the rate in tasks/s; ends at EOF.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "ringpool/pool.hpp"

using namespace ringpool;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// n no-op tasks split over `threads` service threads, each submitting its share and then
// collecting its futures; returns tasks/s.
double throughput(Pool& pool, int threads, int n) {
  std::vector<std::thread> ts;
  std::atomic<int> bad{0};
  const auto t0 = Clock::now();
  for (int k = 0; k < threads; ++k) {
    ts.emplace_back([&, k] {
      const int mine = n / threads + (k < n % threads ? 1 : 0);
      std::vector<std::future<Value>> fs;
      fs.reserve(mine);
      for (int i = 0; i < mine; ++i) fs.push_back(pool.submit("benchtasks:noop", {Value(i)}));
      for (int i = 0; i < mine; ++i)
        if (fs[i].get().as_int() != i) ++bad;
    });
  }
  for (auto& t : ts) t.join();
  const double dt = seconds_since(t0);
  if (bad) std::fprintf(stderr, "bench_pool_cpp: %d wrong results\n", bad.load());
  return n / dt;
}

// n no-op tasks as one Pool::map from one thread (one future for the batch); returns tasks/s.
double map_throughput(Pool& pool, int n) {
  const auto t0 = Clock::now();
  std::vector<std::vector<Value>> calls(n);
  for (int i = 0; i < n; ++i) calls[i].emplace_back(i);
  std::vector<Value> out = pool.map("benchtasks:noop", std::move(calls)).get();
  const double dt = seconds_since(t0);
  int bad = 0;
  for (int i = 0; i < n; ++i) bad += out[i].as_int() != i;
  if (bad) std::fprintf(stderr, "bench_pool_cpp: %d wrong map results\n", bad);
  return n / dt;
}

// n no-op tasks from one thread through async_submit (a callback per task, as an event-driven
// service uses the pool); returns tasks/s once every callback has run.
double callback_throughput(Pool& pool, int n) {
  std::atomic<int> done{0}, bad{0};
  const auto t0 = Clock::now();
  for (int i = 0; i < n; ++i)
    pool.async_submit("benchtasks:noop", {Value(i)}, {}, [&done, &bad, i](std::exception_ptr err, Value v) {
      if (err || v.as_int() != i) bad.fetch_add(1, std::memory_order_relaxed);
      done.fetch_add(1, std::memory_order_release);
    });
  while (done.load(std::memory_order_acquire) < n) std::this_thread::sleep_for(std::chrono::microseconds(100));
  const double dt = seconds_since(t0);
  if (bad) std::fprintf(stderr, "bench_pool_cpp: %d wrong callback results\n", bad.load());
  return n / dt;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_pool_cpp SOURCE_DIR [--quick]\n");
    return 2;
  }
  const std::string src = argv[1];
  const bool quick = argc > 2 && std::strcmp(argv[2], "--quick") == 0;
  const bool paired = argc > 2 && std::strcmp(argv[2], "--paired") == 0;
  PoolOptions o;
  o.workers = 2;
  o.python_path = {src + "/bindings"};
  o.packages = {{"benchtasks", src + "/benchmarks/tasks/benchtasks"}};
  Pool pool(o);
  throughput(pool, 1, 2000);  // warm-up
  if (paired) {
    std::printf("ready\n");
    std::fflush(stdout);
    // A line "N": N tasks through submit (a future each); "map N": one Pool::map of N.
    char line[64];
    while (std::fgets(line, sizeof line, stdin)) {
      const bool as_map = std::strncmp(line, "map ", 4) == 0;
      const int n = static_cast<int>(std::clamp<long>(std::atol(line + (as_map ? 4 : 0)), 1, 50'000'000));
      std::printf("%.1f\n", as_map ? map_throughput(pool, n) : throughput(pool, 1, n));
      std::fflush(stdout);
    }
    return 0;
  }
  std::printf("{");
  for (int threads : {1, 4}) {
    // Size n so that a run takes about a second (less with --quick).
    const double budget = quick ? 0.3 : 1.0;
    int n = 2000;
    double rate = throughput(pool, threads, n);
    n = std::max(1000, static_cast<int>(rate * budget));
    std::vector<double> rates;
    for (int r = 0; r < (quick ? 1 : 3); ++r) rates.push_back(throughput(pool, threads, n));
    std::sort(rates.begin(), rates.end());
    std::printf("\"threads_%d\": {\"tasks\": %d, \"tasks_per_s\": %.1f}, ", threads, n, rates[rates.size() / 2]);
  }
  {
    int n = std::max(1000, static_cast<int>(map_throughput(pool, 2000) * (quick ? 0.3 : 1.0)));
    std::vector<double> rates;
    for (int r = 0; r < (quick ? 1 : 3); ++r) rates.push_back(map_throughput(pool, n));
    std::sort(rates.begin(), rates.end());
    std::printf("\"map\": {\"tasks\": %d, \"tasks_per_s\": %.1f}, ", n, rates[rates.size() / 2]);
  }
  {
    int n = std::max(1000, static_cast<int>(callback_throughput(pool, 2000) * (quick ? 0.3 : 1.0)));
    std::vector<double> rates;
    for (int r = 0; r < (quick ? 1 : 3); ++r) rates.push_back(callback_throughput(pool, n));
    std::sort(rates.begin(), rates.end());
    std::printf("\"callbacks\": {\"tasks\": %d, \"tasks_per_s\": %.1f}, ", n, rates[rates.size() / 2]);
  }
  const int calls = quick ? 300 : 3000;
  std::vector<double> lat;
  for (int i = 0; i < calls; ++i) {
    const auto t0 = Clock::now();
    pool.submit("benchtasks:noop", {Value(i)}).get();
    lat.push_back(seconds_since(t0) * 1e6);
  }
  std::sort(lat.begin(), lat.end());
  std::printf("\"latency\": {\"calls\": %d, \"median_us\": %.1f, \"p99_us\": %.1f}}\n", calls, lat[lat.size() / 2],
              lat[lat.size() * 99 / 100]);
  return 0;
}
