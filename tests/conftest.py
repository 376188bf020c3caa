"""Shared fixtures: small simulated datasets with known ground truth (do not modify them in tests)."""

from __future__ import annotations

import pytest
import torch

from genailab.data.simulate import simulate


@pytest.fixture(scope="session")
def sim_adata():
    """600 cells x 200 genes, 3 cell types, 2 batches, NB counts, seed 0."""
    return simulate(600, 200, n_cell_types=3, n_batches=2, likelihood="nb", seed=0)


@pytest.fixture(scope="session")
def sim_adata_zinb():
    """As ``sim_adata`` with ZINB counts (dropout 0.1)."""
    return simulate(600, 200, n_cell_types=3, n_batches=2, likelihood="zinb", dropout=0.1, seed=0)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_session():
    """Run torch on one thread, here and in child processes (torchrun, ``python -m genailab``): the
    tests' tiny models train fastest so, above all on a busy machine, and runs in and out of process
    sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_torch_thread(one_torch_thread_per_session):
    """One thread again before and after every test (so also for the next module's fixtures): numba's
    OpenMP start-up, inside scanpy's neighbours, raises the process-wide count to the core count."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
