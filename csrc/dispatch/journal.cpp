// SQLite journal. WAL mode with synchronous=OFF: a committed transaction is in the OS page cache the
// moment the commit returns, so it survives a crash or SIGKILL of the dispatcher (the threat the
// journal is for) without an fsync on the run loop's path (fsyncs on a busy shared disk stalled
// the loop for half a second); only an OS crash or power loss may lose the last records, and then
// resume re-runs those tasks (outputs are atomic, so nothing half-done is ever counted as done).
#include "dispatch/journal.h"

#include <ctime>
#include <stdexcept>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace gpufleet::dispatch {

namespace {
double now_epoch() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec * 1e-9;
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
    throw std::runtime_error(fmt::format("cannot open the journal '{}': {}", path, msg));
  }
  sqlite3_busy_timeout(db_, 5000);
  exec("PRAGMA journal_mode=WAL");
  exec("PRAGMA synchronous=OFF");
  exec("CREATE TABLE IF NOT EXISTS runs(run_id TEXT PRIMARY KEY, started REAL, finished REAL, description TEXT, status TEXT)");
  exec("CREATE TABLE IF NOT EXISTS tasks(key TEXT PRIMARY KEY, name TEXT, state TEXT, attempts INTEGER, device TEXT,"
       " slot INTEGER, start REAL, end REAL, exit_code INTEGER, signal INTEGER, outputs TEXT, argv TEXT, log_path TEXT,"
       " message TEXT, run_id TEXT)");
  exec("CREATE TABLE IF NOT EXISTS attempts(key TEXT, attempt INTEGER, device TEXT, slot INTEGER, start REAL, end REAL,"
       " status TEXT, exit_code INTEGER, signal INTEGER, message TEXT, run_id TEXT)");
  lookup_ = prepare("SELECT state FROM tasks WHERE key=?1");
  upsert_ = prepare(
      "INSERT INTO tasks(key,name,state,attempts,device,slot,start,end,exit_code,signal,outputs,argv,log_path,message,run_id)"
      " VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15) ON CONFLICT(key) DO UPDATE SET name=?2,state=?3,"
      "attempts=?4,device=?5,slot=?6,start=?7,end=?8,exit_code=?9,signal=?10,outputs=?11,argv=?12,log_path=?13,"
      "message=?14,run_id=?15");
  attempt_ = prepare("INSERT INTO attempts VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)");
}

Journal::~Journal() {
  sqlite3_finalize(lookup_);
  sqlite3_finalize(upsert_);
  sqlite3_finalize(attempt_);
  sqlite3_close(db_);
}

void Journal::exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    throw std::runtime_error(fmt::format("journal '{}': {} (in: {})", path_, msg, sql));
  }
}

sqlite3_stmt* Journal::prepare(const char* sql) {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db_, sql, -1, &s, nullptr) != SQLITE_OK)
    throw std::runtime_error(fmt::format("journal '{}': {}", path_, sqlite3_errmsg(db_)));
  return s;
}

void Journal::begin_run(const std::string& run_id, const std::string& description) {
  sqlite3_stmt* s = prepare("INSERT OR REPLACE INTO runs VALUES(?1,?2,NULL,?3,'running')");
  bind_text(s, 1, run_id);
  sqlite3_bind_double(s, 2, now_epoch());
  bind_text(s, 3, description);
  int rc = sqlite3_step(s);
  sqlite3_finalize(s);
  if (rc != SQLITE_DONE) throw std::runtime_error(fmt::format("journal '{}': {}", path_, sqlite3_errmsg(db_)));
}

void Journal::end_run(const std::string& run_id, const std::string& status) {
  sqlite3_stmt* s = prepare("UPDATE runs SET finished=?2, status=?3 WHERE run_id=?1");
  bind_text(s, 1, run_id);
  sqlite3_bind_double(s, 2, now_epoch());
  bind_text(s, 3, status);
  sqlite3_step(s);
  sqlite3_finalize(s);
}

bool Journal::succeeded(const std::string& key) {
  sqlite3_reset(lookup_);
  bind_text(lookup_, 1, key);
  bool ok = false;
  if (sqlite3_step(lookup_) == SQLITE_ROW) {
    const unsigned char* state = sqlite3_column_text(lookup_, 0);
    ok = state && std::string(reinterpret_cast<const char*>(state)) == "succeeded";
  }
  sqlite3_reset(lookup_);
  return ok;
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
  bind_text(upsert_, 11, outs.dump());
  bind_text(upsert_, 12, argv.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  bind_text(upsert_, 13, ev.log_path);
  sqlite3_bind_null(upsert_, 14);
  bind_text(upsert_, 15, run_id);
  if (sqlite3_step(upsert_) != SQLITE_DONE)
    throw std::runtime_error(fmt::format("journal '{}': {}", path_, sqlite3_errmsg(db_)));
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
  bind_text(upsert_, 11, outs.dump());
  bind_text(upsert_, 12, argv.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
  bind_text(upsert_, 13, ev.log_path);
  bind_text(upsert_, 14, ev.message);
  bind_text(upsert_, 15, run_id);
  int rc2 = sqlite3_step(upsert_);
  sqlite3_reset(upsert_);
  if (rc != SQLITE_DONE || rc2 != SQLITE_DONE) {
    std::string msg = sqlite3_errmsg(db_);
    exec("ROLLBACK");
    throw std::runtime_error(fmt::format("journal '{}': {}", path_, msg));
  }
  exec("COMMIT");
}

}  // namespace gpufleet::dispatch
