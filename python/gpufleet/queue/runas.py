"""Runs one job of a group queue as the user who submitted it (Note [Who may use a queue] in paths.py).

The daemon of a group queue runs as root; the dispatcher starts this script (``python -I``: no
PYTHON* variable, no user site, nothing from the job's environment is read while it is root) as
``runas.py UID CWD -- ARGV...`` in the job's process group, with the job's environment as JSON in
GPUFLEET_QUEUE_JOB_ENV. It drops to the user (supplementary groups, gid, uid, for good), enters the
job's directory as that user, applies the job's environment under the variables the dispatcher set
(the GPU, the task ids, the run's marker: those win) and execs the command, which keeps the pid the
dispatcher and the supervisor know. Stdlib only, run as a file.
"""
import json
import os
import pwd
import sys
import warnings  # noqa: F401 - os.execvpe imports it; after the drop the interpreter's files may be out of reach

ENV_VAR = "GPUFLEET_QUEUE_JOB_ENV"
_KEEP = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUFLEET_TASK_ID", "GPUFLEET_TASK_NAME", "GPUFLEET_DEVICE",
         "GPUFLEET_SLOT", "GPUFLEET_ATTEMPT", "GPUFLEET_RUN_ID", "GPUFLEET_JOB_ID")


def main(args: list) -> int:
    if len(args) < 4 or args[2] != "--":
        print("usage: runas.py UID CWD -- ARGV...", file=sys.stderr)
        return 2
    uid, cwd, argv = int(args[0]), args[1], args[3:]
    job_env = json.loads(os.environ.pop(ENV_VAR, "{}"))
    pw = pwd.getpwuid(uid)
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(uid, uid, uid)
    env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}
    env.update({k: v for k, v in os.environ.items() if k not in ("HOME", "USER", "LOGNAME")})
    env.update({k: v for k, v in job_env.items() if k not in _KEEP})
    try:
        os.chdir(cwd)
    except OSError as e:
        print(f"gpufleet: cannot enter the job's directory {cwd!r} as {pw.pw_name}: {e.strerror}", file=sys.stderr)
        return 126
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"gpufleet: cannot start {argv[0]!r} as {pw.pw_name}: {e.strerror}", file=sys.stderr)
        return 127
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
