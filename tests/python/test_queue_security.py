"""Who may use a queue (Note [Who may use a queue] in python/gpufleet/queue/paths.py), with real
uids: throwaway users and a group made with useradd/groupadd, clients run as them in forked children
that drop root's privileges (setresuid: SO_PEERCRED then reports their uid). A second uid is refused
by a private queue, even when its directory was opened by mistake; a group queue lets its members
see every job and act on their own only, runs each job as its owner, and refuses everyone else."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile

import pytest

from queue_helpers import make_queue, queue  # noqa: F401 (fixtures)

from gpufleet.queue import client, daemon, paths as qpaths
from gpufleet.queue.protocol import encode, read_message

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users and a group, and runs clients "
                                                          "as them (setresuid)")


def as_user(user: dict, fn, *args):
    """fn(*args) in a forked child running as ``user`` (uid, gid, groups); its result or its error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out = {}
        try:
            os.close(r)
            os.setgroups(user["groups"])
            os.setresgid(user["gid"], user["gid"], user["gid"])
            os.setresuid(user["uid"], user["uid"], user["uid"])
            out = {"ok": fn(*args)}
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            out = {"error": f"{type(e).__name__}: {e}"}
        finally:
            os.write(w, json.dumps(out, default=str).encode())
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def raw_request(path: str, msg: dict) -> dict:
    """A request sent without the client's own checks (as a hostile program would)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(encode(msg))
    reply = read_message(s.makefile("rb"))
    s.close()
    return reply


@pytest.fixture
def users():
    """A group with two members and a third user outside it; removed afterwards."""
    tag = secrets.token_hex(3)
    group = f"gfqlab{tag}"
    made = []
    try:
        subprocess.run(["groupadd", group], check=True, capture_output=True)
        out = {"group": group}
        for who, member in (("a", True), ("b", True), ("c", False)):
            name = f"gfq{who}{tag}"
            cmd = ["useradd", "-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin", name]
            subprocess.run(cmd + (["-G", group] if member else []), check=True, capture_output=True)
            made.append(name)
            pw = pwd.getpwnam(name)
            out[who] = {"name": name, "uid": pw.pw_uid, "gid": pw.pw_gid, "groups": os.getgrouplist(name, pw.pw_gid)}
        yield out
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)


def test_a_private_queue_refuses_a_directory_with_loose_modes_or_not_a_directory(queue, tmp_path):
    os.chmod(queue.dir, 0o755)  # as a careless mkdir would leave it
    r = queue.gf("queue", "start")
    assert r.returncode == 1 and "has mode 0755: a private queue's directory must be 0700" in r.stderr
    assert stat.S_IMODE(os.stat(queue.dir).st_mode) == 0o755 and os.listdir(queue.dir) == []  # left as it was
    r = queue.gf("submit", "--", "true")
    assert r.returncode == 1 and "must be 0700" in r.stderr
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tempfile.mktemp(prefix="gfq-link-", dir="/tmp")
    os.symlink(real, link)
    try:
        r = queue.gf("queue", "start", env={"GPUFLEET_QUEUE_DIR": link})
        assert r.returncode == 1 and "is not a directory (a symlink or a file)" in r.stderr
    finally:
        os.unlink(link)
    os.chmod(queue.dir, 0o700)


@needs_root
def test_a_second_uid_is_refused_by_a_private_queue(queue, users, tmp_path, monkeypatch):
    other = users["c"]
    jid = queue.submit("sleep", "30")
    monkeypatch.setenv("GPUFLEET_QUEUE_DIR", queue.dir)

    def ls():
        return client.request("ls")["jobs"]

    r = as_user(other, ls)
    assert "permission denied" in r["error"] and "not open to uid" in r["error"]
    # The directory opened by mistake: the client still refuses it, and the daemon refuses the uid.
    os.chmod(queue.dir, 0o711)
    os.chmod(os.path.join(queue.dir, "queue.sock"), 0o666)
    r = as_user(other, ls)
    assert f"belongs to root, not {other['name']}" in r["error"]
    sock = os.path.join(queue.dir, "queue.sock")
    for msg in ({"op": "ls"}, {"op": "cancel", "ids": [jid]},
                {"op": "submit", "argv": ["touch", str(tmp_path / "pwned")], "cwd": "/", "env": {}}):
        reply = as_user(other, raw_request, sock, msg)["ok"]
        assert reply["ok"] is False and f"permission denied: this is the private queue of uid 0" in reply["error"]
    os.chmod(queue.dir, 0o700)
    assert [j["id"] for j in queue.ls()] == [jid] and queue.job(jid)["state"] == "running"
    assert not (tmp_path / "pwned").exists()


@needs_root
def test_a_client_refuses_a_daemon_of_another_uid(users):
    victim = users["c"]
    d = tempfile.mkdtemp(prefix="gfq-imp-", dir="/tmp")
    os.chown(d, victim["uid"], victim["gid"])
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # root listening in the victim's directory
    try:
        impostor.bind(os.path.join(d, "queue.sock"))
        os.chmod(os.path.join(d, "queue.sock"), 0o666)
        impostor.listen()
        os.environ["GPUFLEET_QUEUE_DIR"] = d
        r = as_user(victim, lambda: client.request("ls"))
        assert f"runs as uid 0, not {victim['uid']}: refusing to use it" in r["error"]
    finally:
        os.environ.pop("GPUFLEET_QUEUE_DIR", None)
        impostor.close()
        shutil.rmtree(d)


@needs_root
def test_a_group_queue_lets_members_see_all_and_act_on_their_own_jobs(users, make_queue):
    q = make_queue("1")
    os.rmdir(q.dir)  # the daemon makes it: root's, the group's, 0710
    group, a, b, c = users["group"], users["a"], users["b"], users["c"]
    q.group = group
    work = tempfile.mkdtemp(prefix="gfq-work-", dir="/tmp")
    os.chmod(work, 0o777)
    os.environ["GPUFLEET_QUEUE_DIR"] = q.dir
    try:
        r = as_user(a, daemon.run, qpaths.locate(group), {}, lambda text: None)
        assert r["ok"] == 1 and not os.path.exists(q.dir)  # a member cannot start it: root must
        q.gf("queue", "start", "--group", group, "--kill-grace", "1", "--cpu-slots", "4", check=True)
        st = os.stat(q.dir)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o710) and st.st_gid == qpaths.group_id(group)
        sock = os.stat(os.path.join(q.dir, "queue.sock"))
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == qpaths.group_id(group)

        def submit(cmd):
            return client.submit(["sh", "-c", cmd], cwd=work, group=group, gpus=0).id

        a1 = as_user(a, submit, "id -u > a_uid; echo secret; sleep 30")["ok"]
        a2 = as_user(a, submit, "sleep 30")["ok"]
        b1 = as_user(b, submit, "id -u > b_uid; id -g >> b_uid")["ok"]
        seen = as_user(b, lambda: [(j["id"], j["user"]) for j in client.request("ls", group)["jobs"]])["ok"]
        assert seen == [[a1, a["name"]], [a2, a["name"]], [b1, b["name"]]]
        assert as_user(b, lambda: client.Job(b1, group=group).wait())["ok"] == 0
        for op in (lambda: client.Job(a1, group=group).cancel(), lambda: client.Job(a1, group=group).log):
            err = as_user(b, op)["error"]
            assert f"job {a1} belongs to {a['name']}: only its owner or root may" in err
        assert as_user(a, lambda: client.Job(a2, group=group).cancel())["ok"] == "cancelled"
        err = as_user(c, lambda: client.request("ls", group))["error"]
        assert "permission denied" in err
        os.chmod(q.dir, 0o711)  # opened by mistake: the daemon still refuses a non-member
        os.chmod(os.path.join(q.dir, "queue.sock"), 0o666)
        reply = as_user(c, raw_request, os.path.join(q.dir, "queue.sock"), {"op": "ls"})["ok"]
        assert reply["ok"] is False and f"uid {c['uid']} is not a member of the group" in reply["error"]
        os.chmod(q.dir, 0o710)
        os.chmod(os.path.join(q.dir, "queue.sock"), 0o660)
        until_file = os.path.join(work, "a_uid")
        from dispatch_helpers.proc_utils import wait_for

        assert wait_for(lambda: os.path.exists(until_file) and os.path.getsize(until_file) > 0, 30)
        assert "secret" in as_user(a, lambda: client.Job(a1, group=group).log)["ok"]
        assert client.Job(a1, group=group).cancel() == "cancelled"  # root may
        with open(until_file) as f:
            assert int(f.read()) == a["uid"]  # each job ran as its owner
        with open(os.path.join(work, "b_uid")) as f:
            assert f.read().split() == [str(b["uid"]), str(b["gid"])]
        assert os.stat(until_file).st_uid == a["uid"]
        r = as_user(a, lambda: client.request("stop", group))
        assert "only root may stop this queue" in r["error"]
        err = as_user(a, lambda: client.submit(["true"], outputs=["x"], cwd=work, group=group))["error"]
        assert "--output is not available in a group queue" in err
    finally:
        os.environ.pop("GPUFLEET_QUEUE_DIR", None)
        shutil.rmtree(work, ignore_errors=True)
