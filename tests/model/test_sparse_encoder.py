"""The encoder's first layer on a count matrix's stored entries (the inference path) against the
dense product: a float64 numpy reference, the dense MLP, and the dense encoder of each model."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from genailab.likelihood.sparse_counts import SparseCounts
from genailab.model.layers import MLP
from genailab.model.vae import CVAE, CVAE_ZINB


def _counts(n: int, g: int, density: float, seed: int = 0) -> sp.csr_matrix:
    """(n, g) Poisson counts with about ``density`` of the entries non-zero, an all-zero row (2)
    and one explicitly stored zero, float32 CSR."""
    rng = np.random.default_rng(seed)
    dense = (rng.poisson(4.0, (n, g)) + 1) * (rng.random((n, g)) < density)
    dense[2] = 0
    matrix = sp.csr_matrix(dense.astype(np.float32))
    matrix.data[0] = 0.0  # stored, but zero: adds nothing
    assert matrix.nnz > 0 and matrix.data[0] == 0
    return matrix


def _entries(matrix: sp.csr_matrix) -> SparseCounts:
    return SparseCounts.from_scipy(matrix)


def test_first_layer_on_the_stored_entries_equals_the_dense_product_in_float64():
    """relu([x, extra] @ W.T + b) computed plainly in float64, extra columns included."""
    torch.manual_seed(0)
    x = _counts(9, 30, density=0.3)
    extra = torch.randn(9, 4)
    mlp = MLP(34, (16,), norm="none", activation="relu", dropout=0.0).eval()
    with torch.no_grad():
        result = mlp.forward_sparse(_entries(x), extra).numpy()
    linear = mlp.layers[0]
    inputs = np.hstack([x.toarray().astype(np.float64), extra.numpy().astype(np.float64)])
    expected = np.maximum(inputs @ linear.weight.detach().numpy().astype(np.float64).T + linear.bias.detach().numpy(), 0)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)  # row 2 (empty): bias and extra only


def test_mlp_forward_sparse_equals_forward_with_batch_norm_in_eval_mode():
    torch.manual_seed(1)
    x = _counts(40, 50, density=0.2, seed=1)
    mlp = MLP(50, (24, 12), norm="batch", activation="relu", dropout=0.1)
    with torch.no_grad():
        for layer in mlp.layers:
            if isinstance(layer, torch.nn.BatchNorm1d):  # statistics away from (0, 1), as after training
                layer.running_mean.normal_(0.0, 2.0)
                layer.running_var.uniform_(0.5, 3.0)
    mlp.eval()
    with torch.no_grad():
        dense = mlp(torch.from_numpy(x.toarray()))
        sparse = mlp.forward_sparse(_entries(x))
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=1e-5, atol=1e-5 * float(dense.abs().max()))


def test_the_kept_gene_rows_follow_every_change_of_the_weight():
    """The transposed first-layer weight that inference keeps between batches is rebuilt after an
    optimiser step, a state-dict load and a change of dtype: the sparse forward then equals the
    dense one of the changed network each time, under inference mode and no_grad alike."""
    torch.manual_seed(3)
    x = _counts(30, 40, density=0.25, seed=3)
    x_dense = torch.from_numpy(x.toarray())
    mlp = MLP(40, (16,), norm="none", activation="relu", dropout=0.0)

    def check(mode):
        with mode():
            sparse, dense = mlp.forward_sparse(_entries(x)), mlp(x_dense)
        np.testing.assert_allclose(sparse.double().numpy(), dense.double().numpy(), rtol=1e-4, atol=1e-4)
        return sparse

    before = check(torch.inference_mode)
    assert torch.equal(check(torch.no_grad), before)  # kept rows, same result
    kept = mlp._gene_rows[2]
    optimiser = torch.optim.SGD(mlp.parameters(), lr=0.5)
    mlp(x_dense).square().sum().backward()
    optimiser.step()  # in place: a new version of the same tensor
    after_step = check(torch.no_grad)
    assert not torch.allclose(after_step, before) and mlp._gene_rows[2] is not kept
    state = {k: v + 0.1 for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(state)
    assert not torch.allclose(check(torch.inference_mode), after_step)
    mlp.double()  # another storage and dtype
    x = sp.csr_matrix(x, dtype=np.float64)
    x_dense = x_dense.double()
    assert check(torch.no_grad).dtype == torch.float64
    with torch.enable_grad():  # with gradients nothing is kept: the product stays differentiable
        mlp.forward_sparse(_entries(x)).sum().backward()
    assert mlp.layers[0].weight.grad is not None


@pytest.mark.parametrize("density", [0.2, 0.8])
@pytest.mark.parametrize("model_class", [CVAE_ZINB, CVAE])
def test_encode_with_stored_entries_equals_the_dense_encoder(model_class, density):
    """Counts through log1p (ZINB) or values as they are (Gaussian), with categorical conditions
    injected into the encoder; above half the entries stored the dense encoder runs itself."""
    torch.manual_seed(2)
    model = model_class(input_dim=60, latent_dim=5, condition_dim=2, hidden_dims=[32, 16],
                        categorical_sizes=(3,), embedding_dim=2).eval()  # fmt: skip
    x = _counts(50, 60, density=density, seed=2)
    c = torch.tensor(np.random.default_rng(2).integers(0, 3, (50, 1)), dtype=torch.float32)
    x_dense = torch.from_numpy(x.toarray())
    with torch.inference_mode():
        mean, var = model.encode(x_dense, c)
        sparse_mean, sparse_var = model.encode(x_dense, c, x_sparse=_entries(x))
        entries_only = model.encode(None, c, x_sparse=_entries(x))  # x built from the entries if needed
    assert torch.equal(entries_only[0], sparse_mean) and torch.equal(entries_only[1], sparse_var)
    if density > 0.5:
        assert torch.equal(sparse_mean, mean) and torch.equal(sparse_var, var)
    else:
        assert not torch.equal(sparse_mean, mean)  # the sparse product did run (another summation order)
        np.testing.assert_allclose(sparse_mean.numpy(), mean.numpy(), rtol=1e-5, atol=1e-5 * float(mean.abs().max()))
        np.testing.assert_allclose(sparse_var.numpy(), var.numpy(), rtol=1e-5)
