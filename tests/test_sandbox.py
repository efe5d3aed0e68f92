"""Sandbox for untrusted Python: results, timeouts, and containment of fork/memory/file/network abuse."""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time

import pytest

from picochat.eval.sandbox import _alive, check_program, run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")


def _session_alive(sid: int) -> list[int]:
    """Live (non-zombie) processes in session `sid`."""
    return _alive(sid, field=3)


def _first_int(text: str) -> int:
    return int(text.split()[0])


def test_passing_program():
    r = run_python("import math\nprint('hello', math.factorial(5))")
    assert r.passed and r.status == "passed" and r.returncode == 0
    assert r.stdout == "hello 120\n"
    assert r.seconds < 5


def test_failing_assertion():
    r = run_python("def f(x):\n    return x + 1\nassert f(1) == 3, 'wrong'")
    assert not r.passed and r.status == "failed"
    assert "AssertionError: wrong" in r.stderr
    assert 'File "program.py", line 3' in r.stderr


def test_syntax_error_and_nonzero_exit_fail():
    assert run_python("def f(:\n    pass").status == "failed"
    assert run_python("import sys; sys.exit(3)").status == "failed"
    assert run_python("import sys; sys.exit(0)").status == "passed"


def test_infinite_loop_is_killed_by_timeout():
    t0 = time.monotonic()
    r = run_python("print('start', flush=True)\nwhile True:\n    pass", timeout=1.0)
    assert time.monotonic() - t0 < 1.0 + 2
    assert r.status == "timeout" and not r.passed
    assert "start" in r.stdout  # partial output survives the kill


def test_sleeping_program_is_killed_by_timeout():
    t0 = time.monotonic()
    r = run_python("import time\ntime.sleep(60)", timeout=0.5)
    assert r.status == "timeout" and time.monotonic() - t0 < 0.5 + 2


def test_fork_bomb_is_contained():
    code = "import os\nprint(os.getpid(), flush=True)\nwhile True: os.fork()"
    r = run_python(code, timeout=3.0)
    assert r.status in ("failed", "error"), r
    assert r.seconds < 3.0 + 2
    assert _session_alive(_first_int(r.stdout)) == []
    assert run_python("print(1 + 1)").stdout == "2\n"  # the machine is fine


def _nproc_enforced() -> bool:
    probe = ("import os, time\nn = 0\nfor i in range(64):\n"
             "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
             "    if pid == 0:\n        time.sleep(0.5)\n        os._exit(0)\n    n += 1\nprint(n)")
    r = run_python(probe, guard=False, timeout=5.0)
    return r.status == "passed" and _first_int(r.stdout) < 64


def test_fork_bomb_is_contained_by_rlimits_alone():
    """Without the in-process guard, RLIMIT_NPROC + the process-group kill must hold it."""
    if not _nproc_enforced():
        pytest.skip("RLIMIT_NPROC cannot be enforced here (root without user namespaces)")
    code = "import os\nprint(os.getpid(), flush=True)\nwhile True: os.fork()"
    t0 = time.monotonic()
    r = run_python(code, timeout=2.0, guard=False)
    assert not r.passed and r.status in ("failed", "error", "timeout")
    assert time.monotonic() - t0 < 2.0 + 3
    assert _session_alive(_first_int(r.stdout)) == []
    assert run_python("print(1 + 1)").stdout == "2\n"


@pytest.mark.parametrize("how", [
    "open({p!r}, 'w').write('pwned')",
    "open({p!r}, 'a').write('pwned')",
    "import pathlib; pathlib.Path({p!r}).write_text('pwned')",
    "import os; os.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
    "import io; io.FileIO({p!r}, 'w').close()",
    "import os; os.symlink(os.path.dirname({p!r}), 'link'); "
    "open(os.path.join('link', os.path.basename({p!r})), 'w')",
    "import os, shutil; open('x', 'w').write('pwned'); shutil.move('x', {p!r})",
])
def test_write_outside_temp_dir_is_blocked(tmp_path, how):
    target = tmp_path / "escaped.txt"
    r = run_python(how.format(p=str(target)))
    assert not r.passed and r.status == "error", r
    assert "SandboxViolation" in r.stderr
    assert not target.exists()


@pytest.mark.parametrize("how", [
    "import os; os.remove({p!r})",
    "import os; os.rename({p!r}, 'stolen')",
    "import shutil; shutil.rmtree({d!r})",
    "import os; os.chmod({p!r}, 0o777)",
])
def test_delete_or_modify_outside_temp_dir_is_blocked(tmp_path, how):
    keep = tmp_path / "keep" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    mode = keep.stat().st_mode
    r = run_python(how.format(p=str(keep), d=str(keep.parent)))
    assert not r.passed and r.status == "error", r
    assert keep.read_text() == "precious" and keep.stat().st_mode == mode


def test_files_inside_temp_dir_are_fine():
    code = ("import os, tempfile, shutil\n"
            "open('a.txt', 'w').write('data')\nassert open('a.txt').read() == 'data'\n"
            "os.mkdir('d'); os.rename('a.txt', 'd/b.txt'); shutil.rmtree('d')\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n"
            "print(sorted(os.listdir('.')))")
    r = run_python(code)
    assert r.passed, r
    assert r.stdout == "[]\n"


def test_memory_bomb_fails_with_memory_error():
    r = run_python("x = bytearray(2 * 10**9)\nprint('allocated')", memory_mb=512)
    assert not r.passed and r.status == "failed"
    assert "MemoryError" in r.stderr and "allocated" not in r.stdout


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


def _assert_no_connection(srv):
    time.sleep(0.05)
    with pytest.raises(BlockingIOError):
        conn, _ = srv.accept()
        conn.close()


def test_network_is_blocked(listener):
    port = listener.getsockname()[1]
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "s.sendall(b'hi')\nprint('connected')")
    assert not r.passed and r.status == "error"
    assert "connected" not in r.stdout
    _assert_no_connection(listener)
    r = run_python(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))")
    assert not r.passed
    _assert_no_connection(listener)


def test_network_is_blocked_without_the_guard(listener):
    """The network namespace alone (where the kernel allows one) also stops the connection."""
    port = listener.getsockname()[1]
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "print('connected')", guard=False)
    if r.passed:
        listener.setblocking(True)
        listener.accept()[0].close()
        pytest.skip("no network namespace available here: only the in-process guard blocks sockets")
    assert "connected" not in r.stdout
    _assert_no_connection(listener)


def test_processes_are_blocked():
    for code in ["import subprocess; subprocess.run(['echo', 'hi'])", "import os; os.system('echo hi')",
                 "import os; os.kill(os.getppid(), 9)", "import ctypes"]:
        r = run_python(code)
        assert not r.passed, code
        assert "hi" not in r.stdout


def test_temp_dir_is_removed_afterwards():
    r = run_python("import os\nopen('junk.txt', 'w').write('x' * 1000)\nos.mkdir('sub')\nprint(os.getcwd())")
    assert r.passed, r
    workdir = r.stdout.strip()
    assert os.path.basename(workdir).startswith("picochat-sandbox-")
    assert os.path.realpath(os.path.dirname(workdir)) == os.path.realpath(tempfile.gettempdir())
    assert not os.path.exists(workdir)
    r = run_python("import os\nprint(os.getcwd())\nwhile True: pass", timeout=0.5)
    assert r.status == "timeout" and not os.path.exists(r.stdout.strip())


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("PICOCHAT_SECRET", "s3cret")
    r = run_python("import os\nprint(sorted(os.environ))")
    assert r.passed
    assert "HTTPS_PROXY" not in r.stdout and "PICOCHAT_SECRET" not in r.stdout


def test_output_is_capped():
    r = run_python("print('x' * 10**6)\nprint('done')", max_output=10_000)
    assert r.passed
    assert len(r.stdout) < 10_000 + 200 and "dropped" in r.stdout


HE_PROMPT = 'def add(a, b):\n    """Return a + b."""\n'
HE_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


def test_check_program_humaneval():
    assert check_program(HE_PROMPT, "    return a + b\n", HE_TEST, "add").passed
    r = check_program(HE_PROMPT, "    return a - b\n", HE_TEST, "add")
    assert r.status == "failed" and "AssertionError" in r.stderr
    r = check_program(HE_PROMPT, "    while True:\n        pass\n", HE_TEST, "add", timeout=1.0)
    assert r.status == "timeout"


def test_check_program_early_exit_does_not_pass():
    r = check_program(HE_PROMPT, "    return 0\nimport sys\nsys.exit(0)\n", HE_TEST, "add")
    assert not r.passed and r.status == "failed"
    r = check_program(HE_PROMPT, "    return 0\nimport os\nos._exit(0)\n", HE_TEST, "add")
    assert not r.passed
