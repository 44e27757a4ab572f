// SQLite journal. WAL mode with synchronous=OFF: a committed transaction is in the OS page cache the
// moment the commit returns, so it survives a crash or SIGKILL of the dispatcher (the threat the
// journal is for) without an fsync on the run loop's path (fsyncs on a busy shared disk stalled
// the loop for half a second); only an OS crash or power loss may lose the last records, and then
// resume re-runs those tasks (outputs are atomic, so nothing half-done is ever counted as done).
#include "dispatch/journal.h"

#include <algorithm>
#include <ctime>
#include <map>
#include <stdexcept>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/printable.h"

namespace gpufleet::dispatch {

namespace {
double now_epoch() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
}
// JSON text of file names and argv words: bytes that are not UTF-8 (legal in both) become U+FFFD
// instead of throwing (the columns are for people reading the journal; the task key is exact).
std::string json_text(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}
void bind_text(sqlite3_stmt* s, int i, const std::string& v) {
  sqlite3_bind_text(s, i, v.c_str(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
}
}  // namespace

Journal::Journal(const std::string& path) : path_(path) {
  if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      nullptr) != SQLITE_OK) {
    std::string msg = db_ ? sqlite3_errmsg(db_) : "out of memory";
    sqlite3_close(db_);
    db_ = nullptr;
    throw std::invalid_argument(fmt::format("cannot open the journal '{}': {}", printable(path), msg));
  }
  try {
    sqlite3_busy_timeout(db_, 5000);
    check_is_journal();  // before anything is written: a file that is not a journal stays untouched
  } catch (...) {
    sqlite3_close(db_);
    db_ = nullptr;
    throw;
  }
  try {
    exec("PRAGMA journal_mode=WAL");
    exec("PRAGMA synchronous=OFF");
    exec("CREATE TABLE IF NOT EXISTS runs(run_id TEXT PRIMARY KEY, started REAL, finished REAL, description TEXT, status TEXT)");
    exec("CREATE TABLE IF NOT EXISTS tasks(key TEXT PRIMARY KEY, name TEXT, state TEXT, attempts INTEGER, device TEXT,"
         " slot INTEGER, start REAL, end REAL, exit_code INTEGER, signal INTEGER, outputs TEXT, argv TEXT, log_path TEXT,"
         " message TEXT, run_id TEXT)");
    exec("CREATE TABLE IF NOT EXISTS attempts(key TEXT, attempt INTEGER, device TEXT, slot INTEGER, start REAL, end REAL,"
         " status TEXT, exit_code INTEGER, signal INTEGER, message TEXT, run_id TEXT)");
    lookup_ = prepare("SELECT state, start FROM tasks WHERE key=?1");
    upsert_ = prepare(
        "INSERT INTO tasks(key,name,state,attempts,device,slot,start,end,exit_code,signal,outputs,argv,log_path,message,run_id)"
        " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15) ON CONFLICT(key) DO UPDATE SET name=?2,state=?3,"
        "attempts=?4,device=?5,slot=?6,start=?7,end=?8,exit_code=?9,signal=?10,outputs=?11,argv=?12,log_path=?13,"
        "message=?14,run_id=?15");
    attempt_ = prepare("INSERT INTO attempts VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)");
  } catch (const std::exception& e) {  // a read-only file or directory, a full disk: still the user's input
    sqlite3_finalize(lookup_);
    sqlite3_finalize(upsert_);
    sqlite3_finalize(attempt_);
    sqlite3_close(db_);
    db_ = nullptr;
    std::string why = e.what();
    const std::string prefix = fmt::format("journal '{}': ", printable(path));
    if (why.rfind(prefix, 0) == 0) why.erase(0, prefix.size());
    throw std::invalid_argument(fmt::format("'{}' cannot be used as a gpufleet journal: {}", printable(path),
                                            printable(why, 400)));
  }
}

namespace {
// The columns a journal's tables must have (a journal of an older gpufleet has them all).
const std::map<std::string, std::vector<std::string>> kTables = {
    {"runs", {"run_id", "started", "finished", "description", "status"}},
    {"tasks", {"key", "name", "state", "attempts", "device", "slot", "start", "end", "exit_code", "signal", "outputs",
               "argv", "log_path", "message", "run_id"}},
    {"attempts", {"key", "attempt", "device", "slot", "start", "end", "status", "exit_code", "signal", "message",
                  "run_id"}},
};
}  // namespace

// A new or empty file becomes a journal; an SQLite database that has other tables and not ours, or
// ours with other columns, is someone else's and is refused, like a file that is not SQLite at all.
void Journal::check_is_journal() {
  const auto refuse = [&](const std::string& why) {
    return std::invalid_argument(fmt::format(
        "'{}' is not a gpufleet journal: {}. A journal is the SQLite file in which gpufleet records every task of "
        "its runs (tables runs, tasks, attempts): give the path of a new file, or the journal of an earlier run to "
        "resume it",
        printable(path_), printable(why, 400)));  // SQLite's messages may quote the damaged schema's bytes
  };
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db_, "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name", -1, &s, nullptr) !=
      SQLITE_OK) {
    std::string msg = sqlite3_errmsg(db_);
    sqlite3_finalize(s);
    throw refuse(fmt::format("it is not a readable SQLite database ({})", msg));
  }
  std::vector<std::string> tables;
  int rc;
  while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
    const unsigned char* t = sqlite3_column_text(s, 0);
    tables.emplace_back(t ? reinterpret_cast<const char*>(t) : "");
  }
  std::string msg = sqlite3_errmsg(db_);
  sqlite3_finalize(s);
  if (rc != SQLITE_DONE) throw refuse(fmt::format("it is not a readable SQLite database ({})", msg));
  if (tables.empty()) return;
  // A damaged database can still list its tables; SQLite would fail on the first write, after this
  // file had been changed. quick_check reads every page (milliseconds for a journal of 10,000 tasks).
  {
    sqlite3_stmt* q = nullptr;
    std::string result = "ok";
    if (sqlite3_prepare_v2(db_, "PRAGMA quick_check", -1, &q, nullptr) == SQLITE_OK && sqlite3_step(q) == SQLITE_ROW) {
      const unsigned char* r = sqlite3_column_text(q, 0);
      result = r ? reinterpret_cast<const char*>(r) : "";
    } else {
      result = sqlite3_errmsg(db_);
    }
    sqlite3_finalize(q);
    if (result != "ok") throw refuse(fmt::format("its SQLite database is damaged ({})", printable(result, 120)));
  }
  if (std::find(tables.begin(), tables.end(), "runs") == tables.end()) {
    std::string list;
    for (std::size_t i = 0; i < tables.size() && i < 8; ++i) list += (i ? ", " : "") + printable(tables[i], 40);
    if (tables.size() > 8) list += ", ...";
    throw refuse(fmt::format("it is an SQLite database, but it has no table 'runs' (its tables: {})", list));
  }
  for (const auto& [table, columns] : kTables) {
    if (std::find(tables.begin(), tables.end(), table) == tables.end()) continue;
    sqlite3_stmt* info = prepare(fmt::format("PRAGMA table_info({})", table).c_str());
    std::vector<std::string> have;
    while (sqlite3_step(info) == SQLITE_ROW) {
      const unsigned char* c = sqlite3_column_text(info, 1);
      have.emplace_back(c ? reinterpret_cast<const char*>(c) : "");
    }
    sqlite3_finalize(info);
    for (const auto& c : columns)
      if (std::find(have.begin(), have.end(), c) == have.end())
        throw refuse(fmt::format("its table '{}' has no column '{}'", table, c));
  }
}

Journal::~Journal() {
  sqlite3_finalize(lookup_);
  sqlite3_finalize(upsert_);
  sqlite3_finalize(attempt_);
  sqlite3_close(db_);
}

std::runtime_error Journal::error(const std::string& what) const {
  return std::runtime_error(fmt::format("journal '{}': {}", printable(path_), printable(what, 400)));
}

void Journal::exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    throw error(fmt::format("{} (in: {})", msg, sql));
  }
}

sqlite3_stmt* Journal::prepare(const char* sql) {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db_, sql, -1, &s, nullptr) != SQLITE_OK)
    throw error(sqlite3_errmsg(db_));
  return s;
}

void Journal::begin_run(const std::string& run_id, const std::string& description) {
  sqlite3_stmt* s = prepare("INSERT OR REPLACE INTO runs VALUES(?1,?2,NULL,?3,'running')");
  bind_text(s, 1, run_id);
  sqlite3_bind_double(s, 2, now_epoch());
  bind_text(s, 3, description);
  int rc = sqlite3_step(s);
  sqlite3_finalize(s);
  if (rc != SQLITE_DONE) throw error(sqlite3_errmsg(db_));
}

void Journal::end_run(const std::string& run_id, const std::string& status) {
  sqlite3_stmt* s = prepare("UPDATE runs SET finished=?2, status=?3 WHERE run_id=?1");
  bind_text(s, 1, run_id);
  sqlite3_bind_double(s, 2, now_epoch());
  bind_text(s, 3, status);
  sqlite3_step(s);
  sqlite3_finalize(s);
}

std::optional<Journal::Entry> Journal::lookup(const std::string& key) {
  sqlite3_reset(lookup_);
  bind_text(lookup_, 1, key);
  std::optional<Entry> out;
  if (sqlite3_step(lookup_) == SQLITE_ROW) {
    const unsigned char* state = sqlite3_column_text(lookup_, 0);
    out = Entry{state ? reinterpret_cast<const char*>(state) : "", sqlite3_column_double(lookup_, 1)};
  }
  sqlite3_reset(lookup_);
  return out;
}

bool Journal::succeeded(const std::string& key) {
  auto e = lookup(key);
  return e && e->state == "succeeded";
}

namespace {
void bind_opt_int(sqlite3_stmt* s, int i, const std::optional<int>& v) {
  if (v) sqlite3_bind_int(s, i, *v);
  else sqlite3_bind_null(s, i);
}
}  // namespace

void Journal::record_start(const TaskSpec& task, const TaskEvent& ev, const std::string& devices,
                           const std::string& run_id) {
  nlohmann::json outs = nlohmann::json::array(), argv = task.argv;
  for (const auto& o : task.outputs) outs.push_back(o.final_path);
  sqlite3_reset(upsert_);
  bind_text(upsert_, 1, task.key);
  bind_text(upsert_, 2, task.name);
  bind_text(upsert_, 3, "running");
  sqlite3_bind_int(upsert_, 4, ev.attempt);
  bind_text(upsert_, 5, devices);
  sqlite3_bind_int(upsert_, 6, ev.slot);
  sqlite3_bind_double(upsert_, 7, ev.start);
  sqlite3_bind_null(upsert_, 8);
  sqlite3_bind_null(upsert_, 9);
  sqlite3_bind_null(upsert_, 10);
  bind_text(upsert_, 11, json_text(outs));
  bind_text(upsert_, 12, json_text(argv));
  bind_text(upsert_, 13, ev.log_path);
  sqlite3_bind_null(upsert_, 14);
  bind_text(upsert_, 15, run_id);
  if (sqlite3_step(upsert_) != SQLITE_DONE)
    throw error(sqlite3_errmsg(db_));
  sqlite3_reset(upsert_);
}

void Journal::record_finish(const TaskSpec& task, const TaskEvent& ev, const std::string& devices,
                            const std::string& run_id) {
  exec("BEGIN");
  sqlite3_reset(attempt_);
  bind_text(attempt_, 1, task.key);
  sqlite3_bind_int(attempt_, 2, ev.attempt);
  bind_text(attempt_, 3, devices);
  sqlite3_bind_int(attempt_, 4, ev.slot);
  sqlite3_bind_double(attempt_, 5, ev.start);
  sqlite3_bind_double(attempt_, 6, ev.end);
  bind_text(attempt_, 7, status_name(ev.status));
  bind_opt_int(attempt_, 8, ev.exit_code);
  bind_opt_int(attempt_, 9, ev.signal);
  bind_text(attempt_, 10, ev.message);
  bind_text(attempt_, 11, run_id);
  int rc = sqlite3_step(attempt_);
  sqlite3_reset(attempt_);
  nlohmann::json outs = nlohmann::json::array(), argv = task.argv;
  for (const auto& o : task.outputs) outs.push_back(o.final_path);
  sqlite3_reset(upsert_);
  bind_text(upsert_, 1, task.key);
  bind_text(upsert_, 2, task.name);
  bind_text(upsert_, 3, ev.final || ev.status == TaskStatus::Succeeded ? status_name(ev.status) : "retrying");
  sqlite3_bind_int(upsert_, 4, ev.attempt);
  bind_text(upsert_, 5, devices);
  sqlite3_bind_int(upsert_, 6, ev.slot);
  sqlite3_bind_double(upsert_, 7, ev.start);
  sqlite3_bind_double(upsert_, 8, ev.end);
  bind_opt_int(upsert_, 9, ev.exit_code);
  bind_opt_int(upsert_, 10, ev.signal);
  bind_text(upsert_, 11, json_text(outs));
  bind_text(upsert_, 12, json_text(argv));
  bind_text(upsert_, 13, ev.log_path);
  bind_text(upsert_, 14, ev.message);
  bind_text(upsert_, 15, run_id);
  int rc2 = sqlite3_step(upsert_);
  sqlite3_reset(upsert_);
  if (rc != SQLITE_DONE || rc2 != SQLITE_DONE) {
    std::string msg = sqlite3_errmsg(db_);
    exec("ROLLBACK");
    throw error(msg);
  }
  exec("COMMIT");
}

}  // namespace gpufleet::dispatch
