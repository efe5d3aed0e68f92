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
_ALLOW_EXIT = sys.argv[1] == "1"
_GUARD = sys.argv[2] == "1"
_VIOLATION_EXIT = int(sys.argv[3])
sys.argv = ["program.py"]
_os_exit = os._exit


class SandboxViolation(PermissionError):
    """An operation the sandbox does not allow."""


def _install_guard(root):
    """An audit hook (it cannot be removed; it sees the C-level operation whichever module calls it) that
    stops accidents and casual escapes: new processes (a fork bomb), signals to other processes, the
    network, ctypes, raising rlimits, and changes to files outside the temp dir."""
    import posix
    realpath, join, getcwd, readlink, fsdecode = os.path.realpath, os.path.join, os.getcwd, os.readlink, os.fsdecode
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    forbidden = {"os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "subprocess.Popen",
                 "os.kill", "os.killpg", "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname",
                 "socket.gethostbyaddr", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
                 "resource.setrlimit", "resource.prlimit"}
    last_is_dir_fd = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime", "shutil.rmtree"}

    def check(path, dir_fd=None):
        if path is None or isinstance(path, int):
            return  # an already-open descriptor
        base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd not in (None, -1) else getcwd()
        r = realpath(join(base, fsdecode(path)))  # symlinks resolved: writing through one is caught here
        if not (r == root or r.startswith(root + os.sep) or r == os.devnull):
            raise SandboxViolation(f"sandbox: changing {path!r} outside the sandbox dir is not allowed")

    def hook(event, args):
        if event in forbidden:
            raise SandboxViolation(f"sandbox: {event} is not allowed")
        if event == "open" and (args[2] or 0) & writing:  # builtins.open, io.FileIO, os.open
            check(args[0])
        elif event in last_is_dir_fd:
            check(args[0], args[-1])
        elif event in ("os.rename", "os.link"):  # os.replace and shutil.move too
            check(args[0], args[2])
            check(args[1], args[3])
        elif event == "os.symlink":  # where the link is made
            check(args[1], args[2])
        elif event == "os.truncate":
            check(args[0])

    def early_exit(*args, **kwargs):
        raise SandboxViolation("sandbox: os._exit is not allowed")

    os._exit = posix._exit = early_exit  # it raises no audit event: without this, os._exit(0) would pass
    sys.addaudithook(hook)


if _GUARD:
    _install_guard(os.path.realpath(os.getcwd()))
_g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "program.py"}
try:
    exec(compile(_code, "program.py", "exec"), _g)
except SystemExit as e:
    if _ALLOW_EXIT:
        raise
    sys.stderr.write(f"sandbox: the program called exit({e.code!r}) before finishing\n")
    _os_exit(1)
except BaseException as e:
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip this runner's frame
    _os_exit(_VIOLATION_EXIT if isinstance(e, SandboxViolation) else 1)
