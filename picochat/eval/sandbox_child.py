"""The sandbox child's bootstrap (eval/sandbox.py runs it as `python -I -B -u -X utf8 -c <this file's
text> <allow_exit> <guard> <violation exit code>`; the program arrives on stdin). Never imported.

It is the ONLY place picochat executes model-written code, and it runs in a separate `python -I`
process started by run_python() under rlimits (CPU, memory, processes, files), a fresh session, a
private temp dir and the audit-hook guard below; nothing in the parent process ever exec()s or
eval()s model output."""
if __name__ != "__main__":
    raise ImportError("picochat.eval.sandbox_child is the sandbox's child program, not a module to import")
import os, sys
_code = sys.stdin.buffer.read().decode("utf-8", "replace")
_fd = os.open(os.devnull, os.O_RDONLY); os.dup2(_fd, 0); os.close(_fd)
_ALLOW_EXIT = sys.argv[1] == "1"
_GUARD = sys.argv[2] == "1"
_VIOLATION_EXIT = int(sys.argv[3])
sys.argv = ["program.py"]
_os_exit = os._exit


def _install_guard(root):
    import builtins, faulthandler, io, _io, posix, shutil, resource, signal, socket, _socket
    import subprocess, _posixsubprocess

    class SandboxViolation(PermissionError):
        """An operation the sandbox does not allow."""

    SandboxViolation.__qualname__ = "SandboxViolation"

    builtins.SandboxViolation = SandboxViolation
    realpath, join, isabs, fspath, fsdecode = (os.path.realpath, os.path.join, os.path.isabs,
                                               os.fspath, os.fsdecode)
    getcwd, readlink = os.getcwd, os.readlink
    state = {"busy": False, "violations": 0}
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, dir_fd=None):
        if path is None or isinstance(path, int):
            return True  # an already-open descriptor (or no path at all)
        p = fspath(path)
        if isinstance(p, bytes):
            p = fsdecode(p)
        if isabs(p):
            base = "/"
        elif dir_fd is not None and dir_fd != -1:
            base = readlink(f"/proc/self/fd/{dir_fd}")
        else:
            base = getcwd()
        r = realpath(join(base, p))
        return r == root or r.startswith(root + os.sep) or r == os.devnull

    def deny(what):
        state["violations"] += 1
        raise SandboxViolation(f"sandbox: {what} is not allowed")

    # ---- 1. replaced functions (clear error messages)
    def blocked(name):
        def f(*args, **kwargs):
            deny(name)
        f.__name__ = name
        return f

    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
                 "posix_spawnp", "kill", "killpg", "setsid", "setpgid", "setpgrp", "setuid",
                 "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid",
                 "setresgid", "setgroups", "chroot", "_exit", "pidfd_open", "plock"):
        for mod in (os, posix):
            if hasattr(mod, name):
                setattr(mod, name, blocked(f"os.{name}"))
    subprocess.Popen = blocked("subprocess.Popen")
    _posixsubprocess.fork_exec = blocked("_posixsubprocess.fork_exec")
    for name in ("setrlimit", "prlimit"):
        if hasattr(resource, name):
            setattr(resource, name, blocked(f"resource.{name}"))
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, blocked(f"signal.{name}"))
    for name in ("ctypes", "_ctypes", "cffi", "_cffi_backend", "psutil", "resource_tracker",
                 "multiprocessing.resource_tracker", "pty", "ipdb", "joblib", "tkinter"):
        sys.modules[name] = None  # import raises ImportError

    def no_socket(self, *args, **kwargs):
        deny("network access (socket)")

    for mod in (socket, _socket):  # socket classes whose constructor refuses
        mod.socket = mod.SocketType = type("socket", (mod.socket,), {"__init__": no_socket})
    for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr", "fromfd"):
        setattr(socket, name, blocked(f"socket.{name}"))

    def path_guard(mod, name, npaths=1):
        orig = getattr(mod, name, None)
        if orig is None:
            return None
        keys = ("path", "src", "dst", "name")

        def f(*args, **kwargs):
            paths = list(args[:npaths]) + [kwargs[k] for k in keys if k in kwargs]
            fds = [kwargs.get("dir_fd"), kwargs.get("src_dir_fd"), kwargs.get("dst_dir_fd")]
            for i, p in enumerate(paths):
                fd = fds[0] if fds[0] is not None else fds[min(i + 1, 2)]
                if not inside(p, fd):
                    deny(f"{name}({p!r}) outside the sandbox dir")
            return orig(*args, **kwargs)

        f.__name__ = name
        setattr(mod, name, f)
        return f

    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "lchmod", "chown", "lchown",
                 "chflags", "lchflags", "truncate", "utime", "mkfifo", "mknod", "setxattr",
                 "removexattr"):
        for mod in (os, posix):
            path_guard(mod, name)
    for name in ("rename", "replace", "link"):
        for mod in (os, posix):
            path_guard(mod, name, 2)
    for mod in (os, posix):
        def symlink(src, dst, target_is_directory=False, *, dir_fd=None, _orig=mod.symlink):
            if not inside(dst, dir_fd):  # where the link is created; writes through it are checked
                deny(f"symlink at {dst!r} outside the sandbox dir")
            return _orig(src, dst, target_is_directory, dir_fd=dir_fd)

        def os_open(path, flags, mode=0o777, *, dir_fd=None, _orig=mod.open):
            if flags & writing and not inside(path, dir_fd):
                deny(f"writing {path!r} outside the sandbox dir")
            return _orig(path, flags, mode, dir_fd=dir_fd)

        mod.symlink, mod.open = symlink, os_open
    orig_open = builtins.open

    def open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None,
             closefd=True, opener=None):
        if any(c in mode for c in "wax+") and not inside(file):
            deny(f"writing {file!r} outside the sandbox dir")
        return orig_open(file, mode, buffering, encoding, errors, newline, closefd, opener)

    builtins.open = io.open = _io.open = open
    orig_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if not inside(path):
            deny(f"shutil.rmtree({path!r}) outside the sandbox dir")
        return orig_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
    builtins.help = None
    faulthandler.disable()

    # ---- 2. audit hook: cannot be removed; sees the C-level operations whatever module calls them
    no_go = {"os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
             "subprocess.Popen", "os.kill", "os.killpg", "socket.__new__", "socket.connect",
             "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
             "socket.gethostbyaddr", "socket.sethostname", "ctypes.dlopen", "ctypes.dlsym",
             "ctypes.cdata", "ctypes.call_function", "resource.setrlimit", "resource.prlimit",
             "os.chroot"}
    one_path = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
                "shutil.rmtree"}

    def hook(event, args):
        if state["busy"]:
            return
        state["busy"] = True
        try:
            if event in no_go:
                deny(event)
            elif event == "open":
                path, mode, flags = args
                if ((flags or 0) & writing or (mode and any(c in mode for c in "wax+"))) \
                        and not inside(path):
                    deny(f"writing {path!r} outside the sandbox dir")
            elif event in one_path:
                dir_fd = args[-1] if event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod",
                                                "os.chown", "os.utime") else None
                if not inside(args[0], dir_fd if isinstance(dir_fd, int) else None):
                    deny(f"{event}({args[0]!r}) outside the sandbox dir")
            elif event in ("os.rename", "os.link"):
                if not (inside(args[0], args[2]) and inside(args[1], args[3])):
                    deny(f"{event}({args[0]!r}, {args[1]!r}) outside the sandbox dir")
            elif event == "os.symlink":
                if not inside(args[1], args[2]):
                    deny(f"os.symlink at {args[1]!r} outside the sandbox dir")
        finally:
            state["busy"] = False

    sys.addaudithook(hook)
    return SandboxViolation, state


_root = os.path.realpath(os.getcwd())
if _GUARD:
    _Violation, _state = _install_guard(_root)
else:
    _Violation, _state = (), {"violations": 0}


def _finish():
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass


_g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "program.py"}
try:
    exec(compile(_code, "program.py", "exec"), _g)
except SystemExit as e:
    if not _ALLOW_EXIT:
        sys.stderr.write(f"sandbox: the program called exit({e.code!r}) before finishing\n")
        _finish()
        _os_exit(_VIOLATION_EXIT if _state["violations"] else 1)
    raise
except BaseException as e:
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip this runner's frame
    _finish()
    _os_exit(_VIOLATION_EXIT if (_GUARD and isinstance(e, _Violation)) else 1)
