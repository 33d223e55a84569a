"""Atomic outputs: all or nothing, one writer per output dir, no leftovers, DVC's .gitignore kept."""

import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT

from spo import atomic_write
from spo.atomic_write import OutputLockedError, atomic_dir, atomic_file, output_lock, write_json

# Holds the lock of argv[1] the way a stage does (stage_main, then atomic_dir inside), until killed.
WRITER_SCRIPT = """\
import sys, time
from pathlib import Path
from spo.atomic_write import atomic_dir, output_lock

out, ready = Path(sys.argv[1]), Path(sys.argv[2])
with output_lock(out), atomic_dir(out) as tmp:
    (tmp / "half-written").write_text("x")
    ready.write_text("ready")
    time.sleep(120)
"""


@pytest.fixture
def writer(tmp_path):
    """start() -> a live process writing tmp_path/out (holding its lock, a temp dir half written)."""
    procs = []

    def start() -> subprocess.Popen:
        script, ready = tmp_path / "writer.py", tmp_path / "ready"
        ready.unlink(missing_ok=True)
        script.write_text(WRITER_SCRIPT)
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out"), str(ready)],
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the writer never got ready"
            time.sleep(0.05)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill(proc: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    proc.send_signal(signum)
    proc.wait(timeout=30)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_atomic_dir_replaces_on_success_and_keeps_the_old_on_error(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError
    assert (out / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            write_json(tmp / "metrics.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "out" / "metrics.json").stat().st_mode) == 0o644  # not mkstemp's 0600


def test_replacing_a_dir_keeps_the_gitignores_dvc_wrote_in_it(tmp_path):
    out = tmp_path / "spo"
    (out / "sub").mkdir(parents=True)
    (out / ".gitignore").write_text("/lora\n")
    (out / "sub" / ".gitignore").write_text("/x\n")
    (tmp_path / "spo" / "gone").mkdir()
    (out / "gone" / ".gitignore").write_text("/y\n")
    with atomic_dir(out) as tmp:
        (tmp / "lora").mkdir()
        (tmp / "sub").mkdir()
    assert (out / ".gitignore").read_text() == "/lora\n"
    assert (out / "sub" / ".gitignore").read_text() == "/x\n"
    assert not (out / "gone").exists()  # a folder the new output lacks is not brought back for its .gitignore
    with atomic_dir(out) as tmp:
        (tmp / ".gitignore").write_text("/new\n")
    assert (out / ".gitignore").read_text() == "/new\n"  # the writer's own .gitignore wins


def test_second_writer_fails_at_once_naming_the_dir_and_holder(tmp_path, writer):
    proc = writer()
    start = time.monotonic()
    with pytest.raises(OutputLockedError, match=rf"{tmp_path / 'out'} is being written by another process "
                                                rf"\(pid {proc.pid}\)"):
        with atomic_dir(tmp_path / "out"):
            pass
    assert time.monotonic() - start < 1
    kill(proc)  # the kernel drops a dead holder's flock
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "done").write_text("y")
    assert (tmp_path / "out" / "done").exists()


def test_lock_is_reentrant_within_a_process(tmp_path):
    out = tmp_path / "out"
    with output_lock(out), output_lock(out), atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with output_lock(out):  # released: it can be taken again
        pass


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_next_writer_removes_an_interrupted_writers_temp_dir(tmp_path, writer, signum):
    kill(writer(), signum)  # no handler: nothing cleans up on the way out
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1
    (tmp_path / ".out.old-12345").mkdir()  # killed between the two renames of a replace
    with atomic_dir(tmp_path / "out") as tmp:
        assert sorted(p.name for p in tmp_path.glob(".out.*")) == [".out.lock", tmp.name]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.lock"]


def test_atomic_file_removes_temp_files_of_dead_writers_only(tmp_path):
    (tmp_path / f".m.json.tmp-{dead_pid()}-abc").write_text("{")
    live = tmp_path / f".m.json.tmp-{os.getppid()}-abc"
    live.write_text("{")
    write_json(tmp_path / "m.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "m.json"]
    with pytest.raises(ValueError), atomic_file(tmp_path / "m.json") as tmp:
        tmp.write_text("half")
        raise ValueError
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'


def test_without_file_locks_only_dead_writers_leftovers_are_removed(tmp_path, monkeypatch):
    """A file system without flock (some network mounts): writing still works, unguarded."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(atomic_write.fcntl, "flock", no_locks)
    (tmp_path / f".out.tmp-{dead_pid()}-abc").mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-abc"  # a writer that may still be running
    live.mkdir()
    with output_lock(tmp_path / "out") as exclusive:
        assert exclusive is False
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", live.name, "out"]


def test_stage_command_exits_at_once_when_its_out_dir_is_taken(tmp_path, writer):
    """A stage of a second `dvc repro` beside an orphaned one: one line naming the dir and the pid."""
    proc = writer()
    (tmp_path / "pairs.parquet").write_bytes(b"")  # exists: the lock is what stops it
    result = subprocess.run([sys.executable, "-m", "spo.cli", "validate", "--params", str(REPO_ROOT / "params.yaml"),
                             "--pairs-dir", str(tmp_path / "pairs.parquet"), "--out-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"spo validate: {tmp_path / 'out'} is being written by another process "
                                     f"(pid {proc.pid}); wait for it to end or stop it")
