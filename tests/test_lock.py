"""requirements/lock.txt covers what scripts/install.sh installs: a dependency added to pyproject.toml
without `bash scripts/lock.sh` would be installed at whatever version pip finds that day."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # python >= 3.11
ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_lock_pins_every_dependency_install_sh_installs():
    install = (ROOT / "scripts" / "install.sh").read_text()
    extras = re.search(r"^EXTRAS=(\S+)$", install, re.M).group(1).split(",")
    assert re.search(r"^TORCH_PIN=torch==\S+$", install, re.M)  # scripts/lock.sh reads both lines
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in extras:
        wanted |= {_name(r) for r in project["optional-dependencies"][extra]}
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pins = dict(line.split("==", 1) for line in lock.splitlines() if re.match(r"^[a-z0-9]", line))
    assert all(re.fullmatch(r"[0-9][0-9a-z.+-]*", v) for v in pins.values()), "every line is an exact pin"
    assert wanted - {"torch"} <= set(pins), f"not in the lock: {sorted(wanted - {'torch'} - set(pins))}"
    assert "torch" not in pins  # install.sh pins it: the CPU build here, the CUDA one on a GPU box
    assert "bash scripts/lock.sh" in lock and "://" not in lock  # how to refresh it; no index URL or host
