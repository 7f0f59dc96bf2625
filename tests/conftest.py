"""Test-wide set-up: no network, no caches outside temp dirs, few threads."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

import pytest

_CACHE = tempfile.mkdtemp(prefix="onedc-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": os.path.join(_CACHE, "hf"),
    "TORCH_HOME": os.path.join(_CACHE, "torch"),
    "MPLCONFIGDIR": os.path.join(_CACHE, "mpl"),
    "TORCH_EXTENSIONS_DIR": os.path.join(_CACHE, "torch_extensions"),
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
# onedc eval's anchor-row cache (on by default, ~/.cache/onedc): always a temp dir under test.
os.environ["ONEDC_CACHE_DIR"] = os.path.join(_CACHE, "onedc")


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to reach a non-loopback address fails the test."""
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")
                                      or self.family == getattr(socket, "AF_UNIX", None)):
            return real_connect(self, address)
        raise NetworkAccessError(f"test tried to reach the network: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield


def pytest_configure(config):
    import torch

    # Tiny models gain nothing from intra-op threads; two threads on a shared 2-core box
    # oversubscribe it (a 50-step test went from 0.25 s to 10 s).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield



@pytest.fixture(scope="session")
def short_distill_ckpt(tmp_path_factory):
    """final.ckpt of the 120-step distill run of the embedded default (tests/shared_runs.py).

    Shared by the end-to-end PSNR test and the file-rate test, built once per session: what a
    user's first short run gives, coded through real files.
    """
    from shared_runs import SHORT_DISTILL_STEPS, shared_run, short_distill_run

    return shared_run(tmp_path_factory, f"short-distill-{SHORT_DISTILL_STEPS}", short_distill_run)


@pytest.fixture
def free_master_port(monkeypatch):
    """A free MASTER_PORT for this test's DDP processes (inherited by its subprocesses).

    Two pytest workers may run DDP tests at once; each run then rendezvouses on its own port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return port
