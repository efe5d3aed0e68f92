"""Fixtures shared by the test files (pytest finds this file itself)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads spinning for a busy core make them ~10x slower; restore the setting afterwards.
    Use it per module: pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
