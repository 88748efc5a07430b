"""Shared pytest setup: the `gpu` marker (skipped with a reason where torch has no CUDA device)
and small fixtures."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where torch sees none")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = (f"needs a CUDA GPU: torch {torch.__version__} sees none "
              f"({'CPU-only build' if not torch.version.cuda else 'no device visible'})")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def one_thread():
    """Ops on a few hundred elements: a thread pool costs more than it saves (and on a busy
    2-core machine, 20x more). Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
