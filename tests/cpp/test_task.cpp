// Task records (proto/include/ringpool/proto/task.hpp) against the golden records in
// proto/golden/task (see generate.py there): the C++ pool's writers reproduce every record it
// writes byte for byte, its reader takes every record a worker writes, and every record decodes
// to the fields the manifest names. tests/python/test_task_records.py holds the Python worker to
// the same files.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "ringpool/error.hpp"
#include "ringpool/pickle.hpp"
#include "ringpool/proto/task.hpp"
#include "ringpool/value.hpp"
#include "task_record.hpp"

namespace {

namespace task = ringpool::proto::task;
namespace tr = ringpool::task_record;
using ringpool::Value;

const std::filesystem::path kGoldenDir = std::filesystem::path(RINGPOOL_SOURCE_DIR) / "proto" / "golden" / "task";

std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "cannot open " << p);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// One line of manifest.tsv: name, record ("call" | "result"), writer, the five fields.
struct Golden {
  std::string name, record, writer;
  std::vector<std::string> fields;
  std::string bytes;
};

const std::vector<Golden>& golden() {
  static const std::vector<Golden> all = [] {
    std::vector<Golden> out;
    std::ifstream f(kGoldenDir / "manifest.tsv");
    REQUIRE_MESSAGE(f.good(), "cannot open manifest.tsv");
    for (std::string line; std::getline(f, line);) {
      std::vector<std::string> cols;
      for (std::size_t from = 0;;) {
        const std::size_t tab = line.find('\t', from);
        cols.push_back(line.substr(from, tab == std::string::npos ? std::string::npos : tab - from));
        if (tab == std::string::npos) break;
        from = tab + 1;
      }
      REQUIRE_MESSAGE(cols.size() == 3 + task::call::kFields, "manifest.tsv: 8 columns in '" << line.substr(0, 80) << "'");
      Golden g{cols[0], cols[1], cols[2], {cols.begin() + 3, cols.end()}, {}};
      g.bytes = read_file(kGoldenDir / (g.name + ".pkl"));
      out.push_back(std::move(g));
    }
    REQUIRE(!out.empty());
    return out;
  }();
  return all;
}

// The enumerator names, as the manifest spells them.
std::string_view name_of(task::Op o) {
  switch (o) {
    case task::Op::CALL: return "CALL";
    case task::Op::CHUNK: return "CHUNK";
    case task::Op::PING: return "PING";
    case task::Op::STOP: return "STOP";
    case task::Op::RUN: return "RUN";
  }
  return "?";
}

std::string_view name_of(task::Status s) {
  switch (s) {
    case task::Status::OK: return "OK";
    case task::Status::ERR: return "ERR";
    case task::Status::STARTED: return "STARTED";
    case task::Status::PONG: return "PONG";
    case task::Status::INIT_FAILED: return "INIT_FAILED";
    case task::Status::DIED: return "DIED";
  }
  return "?";
}

std::string ops_of(const Value& v) {
  std::string out;
  ringpool::pickle_dump_ops(out, v);
  return out;
}

}  // namespace

TEST_CASE("task: the golden manifest covers every record file, every op and every status") {
  std::set<std::string> listed, kinds;
  for (const Golden& g : golden()) {
    CHECK(listed.insert(g.name + ".pkl").second);
    CHECK((g.record == "call" || g.record == "result"));
    CHECK((g.writer == "pool" || g.writer == "worker" || g.writer == "executor"));
    kinds.insert(g.record == "call" ? g.fields[task::call::kOp] : g.fields[task::result::kStatus]);
  }
  std::set<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(kGoldenDir))
    if (e.path().extension() == ".pkl") files.insert(e.path().filename().string());
  CHECK(files == listed);
  for (std::int64_t o = 0; o <= task::kMaxOp; ++o) CHECK(kinds.count(std::string(name_of(task::Op(o)))) == 1);
  for (std::int64_t s = 0; s <= task::kMaxStatus; ++s) CHECK(kinds.count(std::string(name_of(task::Status(s)))) == 1);
}

TEST_CASE("task: every golden record decodes to the fields its manifest line names") {
  for (const Golden& g : golden()) {
    CAPTURE(g.name);
    Value v;
    REQUIRE_NOTHROW(v = ringpool::pickle_loads(g.bytes));
    REQUIRE(v.is_tuple());
    const auto& f = v.as_tuple();
    REQUIRE(f.size() == task::call::kFields);
    for (std::size_t i = 0; i < f.size(); ++i) {
      CAPTURE(i);
      if (g.record == "call" && i == task::call::kOp) {
        REQUIRE(f[i].is_int());
        CHECK(name_of(task::Op(f[i].as_int())) == g.fields[i]);
      } else if (g.record == "result" && i == task::result::kStatus) {
        REQUIRE(f[i].is_int());
        CHECK(name_of(task::Status(f[i].as_int())) == g.fields[i]);
      } else {
        CHECK(f[i].repr() == g.fields[i]);
      }
    }
  }
}

TEST_CASE("task: the C++ pool's writers reproduce every call record it writes, byte for byte") {
  std::size_t checked = 0;
  for (const Golden& g : golden()) {
    if (g.writer != "pool") continue;
    CAPTURE(g.name);
    REQUIRE(g.record == "call");
    const Value rec = ringpool::pickle_loads(g.bytes);
    const auto& f = rec.as_tuple();
    const auto kind = task::Op(f[task::call::kOp].as_int());
    std::string out;
    switch (kind) {
      case task::Op::CALL: {
        const std::string body = ops_of(f[task::call::kArgs]) + ops_of(f[task::call::kKwargs]);
        tr::write_call(out, static_cast<std::uint64_t>(f[task::call::kTid].as_int()), ops_of(f[task::call::kFn]), body);
        break;
      }
      case task::Op::RUN: {
        const bool single = !f[task::call::kKwargs].is_none();
        if (single) CHECK(f[task::call::kKwargs].as_int() == task::kSingle);
        tr::begin_run(out, static_cast<std::uint64_t>(f[task::call::kTid].as_int()), ops_of(f[task::call::kFn]));
        for (const Value& item : f[task::call::kArgs].as_list()) out += ops_of(item);
        tr::end_run(out, single);
        break;
      }
      case task::Op::PING:
      case task::Op::STOP:
        out = tr::control_record(kind);
        break;
      default:
        FAIL("the C++ pool writes no " << name_of(kind) << " record");
    }
    CHECK(out == g.bytes);
    ++checked;
  }
  CHECK(checked >= 5);
}

TEST_CASE("task: the C++ pool reads every result record a worker writes, on its fast path and whole") {
  std::string scratch;
  std::size_t checked = 0;
  for (const Golden& g : golden()) {
    if (g.record != "result") continue;
    CAPTURE(g.name);
    const tr::Result whole = tr::result_from(ringpool::pickle_loads(g.bytes));
    CHECK(std::to_string(whole.wid) == g.fields[task::result::kWid]);
    CHECK((whole.tid ? std::to_string(*whole.tid) : "None") == g.fields[task::result::kTid]);
    CHECK(name_of(task::Status(whole.status)) == g.fields[task::result::kStatus]);
    CHECK(whole.value.repr() == g.fields[task::result::kValue]);
    REQUIRE(whole.elapsed.has_value());
    CHECK(Value(*whole.elapsed).repr() == g.fields[task::result::kElapsed]);
    if (g.writer != "worker") continue;
    // The collector's fast path reads the record's own fields from the bytes; it must agree.
    const std::optional<tr::Result> fast = tr::read_result(g.bytes, scratch);
    REQUIRE(fast.has_value());
    CHECK(fast->wid == whole.wid);
    CHECK(fast->tid == whole.tid);
    CHECK(fast->status == whole.status);
    CHECK(fast->value == whole.value);
    CHECK(fast->elapsed == whole.elapsed);
    if (whole.status == static_cast<std::int64_t>(task::Status::ERR) && whole.value.is_tuple()) {
      // A plain worker's error: (type name, message, traceback), all str.
      const auto& e = whole.value.as_tuple();
      REQUIRE(e.size() == task::error::kFields);
      CHECK(e[task::error::kType].is_str());
      CHECK(e[task::error::kMessage].is_str());
      CHECK(e[task::error::kTraceback].is_str());
    }
    ++checked;
  }
  CHECK(checked >= 8);
}

TEST_CASE("task: the fast result reader declines what is not a result record, never misreads it") {
  std::string scratch;
  for (const Golden& g : golden()) {
    CAPTURE(g.name);
    // Every strict prefix: refused (or, at worst, read as the same record: never another one).
    for (std::size_t n = 0; n < g.bytes.size(); ++n) {
      const std::optional<tr::Result> r = tr::read_result(std::string_view(g.bytes).substr(0, n), scratch);
      CHECK_FALSE(r.has_value());
    }
  }
}

TEST_CASE("task: a result record's worker id must be one a pool gives (0..INT_MAX), not cut to an int") {
  std::string scratch;
  const auto record = [](std::int64_t wid) {
    return ringpool::pickle_dumps(Value::tuple({Value(wid), Value(5), Value(static_cast<std::int64_t>(task::Status::OK)),
                                                Value("v"), Value(0.5)}));
  };
  for (std::int64_t wid : {std::int64_t{0}, std::int64_t{7}, std::int64_t{std::numeric_limits<int>::max()}}) {
    CAPTURE(wid);
    const std::string r = record(wid);
    CHECK(tr::result_from(ringpool::pickle_loads(r)).wid == wid);
    const std::optional<tr::Result> fast = tr::read_result(r, scratch);
    REQUIRE(fast.has_value());
    CHECK(fast->wid == wid);
    CHECK(fast->value == Value("v"));
  }
  // 2^32 + 7 would be worker 7 once cut to 32 bits.
  for (std::int64_t wid : {std::int64_t{-1}, std::int64_t{std::numeric_limits<int>::max()} + 1,
                           (std::int64_t{1} << 32) + 7, std::numeric_limits<std::int64_t>::min()}) {
    CAPTURE(wid);
    const std::string r = record(wid);
    CHECK_FALSE(tr::read_result(r, scratch).has_value());
    CHECK_FALSE(tr::read_envelope(r).has_value());
    CHECK_THROWS_WITH_AS(tr::result_from(ringpool::pickle_loads(r)), doctest::Contains("not a worker id"),
                         ringpool::PickleError);
  }
}
