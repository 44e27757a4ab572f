// Journal files (--journal, resume): the input is the file's content. Opening it either refuses it
// (std::invalid_argument: not a journal, left untouched) or gives a journal that can be resumed and
// written; SQLite's own errors on a damaged file surface as std::runtime_error naming the journal.
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>

#include "dispatch/journal.h"
#include "fuzz_common.h"

using gpufleet::dispatch::Journal;

namespace {
std::string read_file(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const unsigned char* data, std::size_t size) {
  static const std::string path = "/tmp/gf-fuzz-journal-" + std::to_string(::getpid()) + ".sqlite";
  for (const char* suffix : {"", "-wal", "-shm", "-journal"}) ::unlink((path + suffix).c_str());
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  // Opening either works or refuses the file (std::invalid_argument, file untouched): anything else
  // (a traceback in Python, a crash) is a bug.
  std::unique_ptr<Journal> j;
  try {
    j = std::make_unique<Journal>(path);
  } catch (const std::invalid_argument& e) {
    check_message(e.what());
    FUZZ_CHECK(std::strstr(e.what(), path.c_str()) != nullptr, "the message does not name the file: %s", e.what());
    if (std::strstr(e.what(), "is not a gpufleet journal")) {  // refused before anything was written
      const std::string after = read_file(path);
      FUZZ_CHECK(after.size() == size && std::memcmp(after.data(), data, size) == 0, "a refused file was changed");
    }
    return 0;
  }
  try {
    gpufleet::dispatch::TaskSpec t;
    t.key = "k1";
    t.name = "task";
    t.argv = {"true", std::string("\xff\xfe", 2)};
    t.outputs = {{"/tmp/out\xff.txt", "/tmp/.out\xff.gfpart.txt"}};
    gpufleet::dispatch::TaskEvent e;
    e.attempt = 1;
    j->succeeded("k1");
    j->begin_run("fuzzrun", "fuzz");
    j->record_start(t, e, "cuda:0", "fuzzrun");
    j->record_finish(t, e, "cuda:0", "fuzzrun");
    FUZZ_CHECK(j->succeeded("k1"), "a recorded success is not found");
    j->end_run("fuzzrun", "finished");
  } catch (const std::runtime_error& e) {  // SQLite's errors on a damaged database, naming the journal
    FUZZ_CHECK(std::strncmp(e.what(), "journal '", 9) == 0, "unexpected error: %s", e.what());
  }
  return 0;
}
