"""Run untrusted Python (HumanEval-style completions) in a separate, limited subprocess.

`run_python(code)` runs `code` with `sys.executable -I -B -u -X utf8` (the bootstrap in
sandbox_child.py) in a fresh temporary directory -- its cwd, $HOME and $TMPDIR, deleted afterwards --
with stdin, stdout and stderr on anonymous temporary files, and returns a `SandboxResult`.
It is not a security boundary against a determined attacker: for hostile code, run the whole
evaluation as an unprivileged user or in a container. What each layer protects against:

1. **Process group + wall clock.** The child has its own session (`start_new_session=True`); after
   it ends or times out the whole group is SIGKILLed until none of it is left, so nothing it started
   (a fork bomb) outlives it. The environment is minimal (no proxies, keys or PYTHON* variables).
2. **Kernel limits** (`preexec_fn`): address space (`memory_mb`: a memory bomb gets MemoryError),
   CPU time (timeout + 1 s), file size (64 MB, its output included: writes past it fail with EFBIG
   instead of filling the disk), open files, no core dumps, and RLIMIT_NPROC against fork bombs. The
   child first moves into new user + network namespaces where the kernel allows: the network
   namespace has no interface at all, and RLIMIT_NPROC then counts only the child's own tasks. The
   kernel does not enforce RLIMIT_NPROC for real uid 0, so a root parent gives the child the real
   uid `nobody` (effective uid 0, to read an interpreter under /root). Without user namespaces a
   non-root child may have its user's current task count + `_NPROC_LIMIT`; a root child then has no
   process limit (layers 1 and 3 hold).
3. **In-process guard** (sandbox_child.py): an audit hook, which the program cannot remove, refuses
   process creation and signals, sockets and DNS, ctypes, setrlimit, and writing, deleting,
   renaming or chmod-ing a path outside the temp dir, with `SandboxViolation` (a PermissionError);
   os._exit is replaced, so an early exit cannot skip HumanEval's tests.

Statuses: "passed" (exit code 0), "failed" (the program ran and ended with an exception or a
non-zero exit: AssertionError, MemoryError, SyntaxError, sys.exit(1)...), "timeout" (wall clock
or CPU limit), "error" (the sandbox stopped it: an uncaught blocked operation, death by a signal
such as SIGSEGV, or the process could not be started). `preexec_fn` is used, so call this
from the main thread of a process that is not heavily multi-threaded.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_NPROC_LIMIT = 16                  # tasks (processes + threads) the sandboxed program may have
_FSIZE_LIMIT = 64 * 1024 * 1024    # largest file it may write (its stdout and stderr included)
_NOFILE_LIMIT = 256
_VIOLATION_EXIT = 86               # exit code the child uses for an uncaught SandboxViolation
_NOBODY = 65534
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

try:  # loaded in the parent: nothing may be imported inside preexec_fn
    _unshare = ctypes.CDLL(None, use_errno=True).unshare
    _unshare.argtypes = [ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
    _unshare = None

# The child's bootstrap, passed to `python -c`; the program arrives on stdin.
_RUNNER = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str            # "passed" | "failed" | "timeout" | "error"
    stdout: str
    stderr: str
    seconds: float
    returncode: int | None = None


def _alive(value: int, field: int = 2) -> list[int]:
    """Live (non-zombie) processes whose process group (field 2 of /proc/PID/stat after the command
    name), or session (field 3), is `value`."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[field]) == value and fields[0] not in "ZX":
            alive.append(int(pid))
    return alive


def _user_task_count(uid: int) -> int:
    """Tasks (threads included: RLIMIT_NPROC counts them) whose real uid is `uid`."""
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            if int(status["Uid"].split()[0]) == uid:
                n += int(status["Threads"])
        except (OSError, ValueError, KeyError):
            continue
    return n


def _make_preexec(memory_mb: int, timeout: float, fallback_nproc: int | None):
    limits = [(resource.RLIMIT_AS, int(memory_mb) * 1024 * 1024),
              (resource.RLIMIT_CPU, int(math.ceil(timeout)) + 1),  # SIGXCPU at the soft limit, SIGKILL 1 s later
              (resource.RLIMIT_FSIZE, _FSIZE_LIMIT), (resource.RLIMIT_NOFILE, _NOFILE_LIMIT), (resource.RLIMIT_CORE, 0)]

    def preexec():  # runs in the forked child before exec: never raise
        is_root, isolated = os.geteuid() == 0, False
        with contextlib.suppress(Exception):
            if is_root:
                os.setresuid(_NOBODY, 0, 0)  # RLIMIT_NPROC is not enforced for real uid 0
            isolated = _unshare is not None and _unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0
            if not isolated and is_root:  # no user namespaces: root keeps uid 0 and gets the network namespace
                os.setresuid(0, 0, 0)
                if _unshare is not None:
                    _unshare(_CLONE_NEWNET)
        nproc = _NPROC_LIMIT if isolated else fallback_nproc
        for which, value in limits + ([(resource.RLIMIT_NPROC, nproc)] if nproc is not None else []):
            try:
                resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))
            except (ValueError, OSError):
                pass  # the hard limit is already lower than `value`: it stays

    return preexec


def _kill_group(pgid: int, deadline: float = 2.0) -> None:
    """SIGKILL the group until nothing in it is alive (a fork bomb keeps making new members)."""
    end = time.monotonic() + deadline
    while True:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if not _alive(pgid) or time.monotonic() > end:
            return
        time.sleep(0.01)


def _read(f, cap: int) -> str:
    f.seek(0)
    data = f.read(cap)
    dropped = os.fstat(f.fileno()).st_size - len(data)
    note = f"\n[... {dropped} more bytes of output dropped ...]\n" if dropped > 0 else ""
    return data.decode("utf-8", "replace") + note


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, *,
               allow_exit: bool = True, guard: bool = True,
               max_output: int = 64 * 1024) -> SandboxResult:
    """Run `code` as a Python program in a sandboxed subprocess; see the module docstring.

    allow_exit=False makes any exit before the end of the program (sys.exit(0), quit()...) a
    failure, so a completion cannot skip the tests by exiting early. guard=False skips the
    in-process guard (layer 3) -- only for testing that the OS-level limits hold on their own.
    Each of stdout and stderr keeps its first `max_output` bytes.
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="picochat-sandbox-")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    fallback_nproc = None if os.geteuid() == 0 else _user_task_count(os.getuid()) + _NPROC_LIMIT
    argv = [sys.executable, "-I", "-B", "-u", "-X", "utf8", "-c", _RUNNER,
            "1" if allow_exit else "0", "1" if guard else "0", str(_VIOLATION_EXIT)]
    try:
        with tempfile.TemporaryFile() as src, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            src.write(code.encode("utf-8", "replace"))
            src.seek(0)
            try:
                proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=src, stdout=out, stderr=err,
                                        start_new_session=True,
                                        preexec_fn=_make_preexec(memory_mb, timeout, fallback_nproc))
            except (OSError, subprocess.SubprocessError) as e:
                return SandboxResult(False, "error", "", f"sandbox: could not start python: {e}",
                                     time.monotonic() - start, None)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # the timed-out program, or whatever it left behind
                proc.wait()
            stdout, stderr = _read(out, max_output), _read(err, max_output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rc = proc.returncode
    if timed_out:
        status = "timeout"
        stderr += f"\nsandbox: killed after the {timeout:g} s timeout\n"
    elif rc == 0:
        status = "passed"
    elif rc in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
        stderr += "\nsandbox: killed by the CPU time limit\n"
    elif rc == _VIOLATION_EXIT or rc < 0:
        status = "error"
        if rc < 0:
            stderr += f"\nsandbox: killed by signal {signal.Signals(-rc).name}\n"
    else:
        status = "failed"
    return SandboxResult(status == "passed", status, stdout, stderr, time.monotonic() - start, rc)


def check_program(prompt: str, completion: str, test: str, entry_point: str,
                  timeout: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run a HumanEval problem: `prompt + completion`, then the `test` code, then check(entry_point).

    Exiting early (sys.exit(0), quit()) counts as a failure, not a pass.
    """
    return run_python(prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n",
                      timeout=timeout, memory_mb=memory_mb, allow_exit=False)
