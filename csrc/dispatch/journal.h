#pragma once
/// The run journal: an SQLite file recording every task's state, attempts, device, times and exit
/// status, committed per event so that a crash loses nothing that had finished.
#include <sqlite3.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch/task.h"

namespace gpufleet::dispatch {

class Journal {
 public:
  /// Opens (creates) the journal at `path`. Throws std::invalid_argument naming the path when it
  /// cannot be opened or is not a journal (not SQLite, or SQLite without the journal's tables):
  /// such a file is left exactly as it was.
  explicit Journal(const std::string& path);
  ~Journal();
  Journal(const Journal&) = delete;
  Journal& operator=(const Journal&) = delete;

  void begin_run(const std::string& run_id, const std::string& description);
  void end_run(const std::string& run_id, const std::string& status);
  /// What the journal holds for `key`: its state ("succeeded", "failed", "running", "retrying", ...)
  /// and the start time of its last attempt (Unix seconds).
  struct Entry {
    std::string state;
    double start = 0;
  };
  std::optional<Entry> lookup(const std::string& key);
  /// Whether `key` is recorded as succeeded.
  bool succeeded(const std::string& key);
  void record_start(const TaskSpec& task, const TaskEvent& ev, const std::string& devices, const std::string& run_id);
  void record_finish(const TaskSpec& task, const TaskEvent& ev, const std::string& devices, const std::string& run_id);

  const std::string& path() const { return path_; }

 private:
  void check_is_journal();
  std::runtime_error error(const std::string& what) const;  // "journal '<path>': <what>"
  void exec(const char* sql);
  sqlite3_stmt* prepare(const char* sql);
  std::string path_;
  sqlite3* db_ = nullptr;
  sqlite3_stmt* lookup_ = nullptr;
  sqlite3_stmt* upsert_ = nullptr;
  sqlite3_stmt* attempt_ = nullptr;
};

}  // namespace gpufleet::dispatch
