"""picochat: train, align, evaluate and serve a small ChatGPT end to end (README.md).

One thing happens on import, before torch loads: torch's compiled-code (inductor) cache is not keyed
by ATEN_CPU_CAPABILITY, and a native run that reused kernels compiled under ATEN_CPU_CAPABILITY=avx2
(the AVX2 class emulated, docs/performance.md) aborted at its first step with heap corruption
("malloc(): unaligned tcache chunk"). So a forced capability gets its own cache folder, unless the
user chose one (TORCHINDUCTOR_CACHE_DIR).
"""
import os as _os

if _os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in _os.environ:
    import getpass as _getpass
    import tempfile as _tempfile
    _os.environ["TORCHINDUCTOR_CACHE_DIR"] = _os.path.join(
        _tempfile.gettempdir(), f"torchinductor_{_getpass.getuser()}_{_os.environ['ATEN_CPU_CAPABILITY']}")
