"""Condition surgery on the tensor models: extended encodings reproduce the reference, new columns start
at the mean of their condition, and training under the freeze changes only the new entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genailab.data.loader import MinibatchLoader
from genailab.errors import ConfigError
from genailab.model.config import ModelConfig
from genailab.model.surgery import (
    ConditionExtension,
    align_new_encoder_columns,
    anchor_to_start,
    extend_conditions,
    freeze_reference,
    cluster_means,
    cluster_offsets,
    joined_clusters,
    kmeans_labels,
    latent_spread_ratio,
    match_cluster_latents,
    mutual_neighbours,
    start_precision,
    trainable_entries,
    training_stages,
    within_cluster_spread,
)
from genailab.model.vae import ConditionalVAE
from genailab.train.config import TrainConfig
from genailab.train.trainer import Trainer

G, L = 30, 4
OLD = (3, 2)  # categories of two conditions (batch, donor) in the reference
ADDED = (2, 1)


def _counts(n, seed):
    return np.random.default_rng(seed).negative_binomial(3, 0.2, size=(n, G)).astype(np.float32)


def _onehot_reference(**options) -> ConditionalVAE:
    torch.manual_seed(0)
    config = ModelConfig(input_dim=G, latent_dim=L, condition_dim=sum(OLD) + 1, hidden_dims=(16,), likelihood="nb",
                         **options)  # fmt: skip
    return ConditionalVAE.from_config(config).eval()


def _embedding_reference() -> ConditionalVAE:
    torch.manual_seed(0)
    config = ModelConfig(input_dim=G, latent_dim=L, categorical_sizes=OLD, n_continuous=1, embedding_dim=3,
                         hidden_dims=(16,), likelihood="gaussian")  # fmt: skip
    return ConditionalVAE.from_config(config).eval()


def _onehot_conditions(codes, sizes, continuous):
    """(n, sum(sizes) + 1): one-hot blocks per condition, then the continuous column."""
    blocks = [np.eye(k, dtype=np.float32)[c] for c, k in zip(codes.T, sizes)]
    return np.concatenate(blocks + [continuous[:, None]], axis=1).astype(np.float32)


def test_onehot_extension_places_columns_and_reproduces_reference_cells():
    reference = _onehot_reference(dispersion="gene-condition")
    extension = ConditionExtension(OLD, ADDED, n_continuous=1)
    model, extended = extend_conditions(reference, extension)
    assert model.config.condition_dim == sum(OLD) + sum(ADDED) + 1
    assert set(extended) == {"encoder.layers.0.weight", "decoder.layers.0.weight", "head.log_theta.per_condition.weight"}
    # layout: batch block 0..2 old, 3..4 new; donor block 5..6 old, 7 new; continuous 8
    old_to_new, _ = extension.onehot_layout()
    np.testing.assert_array_equal(old_to_new, [0, 1, 2, 5, 6, 8])
    np.testing.assert_array_equal(extended["encoder.layers.0.weight"].new_positions, G + np.array([3, 4, 7]))
    np.testing.assert_array_equal(extended["decoder.layers.0.weight"].old_positions, np.r_[np.arange(L), L + old_to_new])

    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, 3, 40), rng.integers(0, 2, 40)], axis=1)
    continuous = rng.normal(size=40).astype(np.float32)
    x = torch.from_numpy(_counts(40, 2))
    c_old = torch.from_numpy(_onehot_conditions(codes, OLD, continuous))
    c_new = torch.from_numpy(_onehot_conditions(codes, extension.new_sizes, continuous))
    with torch.no_grad():
        for a, b in zip(reference.encode(x, c_old), model.encode(x, c_new)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        z = torch.randn(40, L)
        library = x.sum(1, keepdim=True)
        ref_px, new_px = reference.decode(z, c_old, library), model.decode(z, c_new, library)
        torch.testing.assert_close(ref_px.mean, new_px.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref_px.theta, new_px.theta, rtol=1e-5, atol=1e-5)


def test_new_onehot_category_starts_as_the_average_reference_category():
    reference = _onehot_reference()
    model, _ = extend_conditions(reference, ConditionExtension(OLD, ADDED, n_continuous=1))
    x = torch.from_numpy(_counts(10, 3))
    # a cell of new batch 3 and new donor 2 == a cell whose one-hot blocks are uniform over the old categories
    c_new = torch.zeros(10, model.config.condition_dim)
    c_new[:, 3] = 1.0
    c_new[:, 7] = 1.0
    c_average = torch.cat([torch.full((10, 3), 1 / 3), torch.full((10, 2), 1 / 2), torch.zeros(10, 1)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x, c_new)[0], reference.encode(x, c_average)[0], rtol=1e-5, atol=1e-5)


def test_embedding_extension_adds_mean_rows_and_keeps_the_rest():
    reference = _embedding_reference()
    model, extended = extend_conditions(reference, ConditionExtension(OLD, ADDED, n_continuous=1))
    assert model.config.categorical_sizes == (5, 3) and model.config.condition_dim == reference.config.condition_dim
    assert set(extended) == {"condition_embedding.embeddings.0.weight", "condition_embedding.embeddings.1.weight"}
    old_rows = reference.condition_embedding.embeddings[0].weight
    new_rows = model.condition_embedding.embeddings[0].weight
    assert torch.equal(new_rows[:3], old_rows)
    torch.testing.assert_close(new_rows[3], old_rows.mean(0))
    torch.testing.assert_close(new_rows[4], old_rows.mean(0))
    c = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, -1.0]])
    x = torch.randn(2, G)
    with torch.no_grad():
        for a, b in zip(reference.encode(x, c), model.encode(x, c)):
            assert torch.equal(a, b)


def test_extension_must_describe_the_model():
    with pytest.raises(ConfigError, match="condition vector has 6 columns"):
        extend_conditions(_onehot_reference(), ConditionExtension((3, 3), (1, 0), n_continuous=1))
    with pytest.raises(ConfigError, match="embeds conditions with"):
        extend_conditions(_embedding_reference(), ConditionExtension((3, 3), (1, 0), n_continuous=1))
    with pytest.raises(ConfigError, match="unfreeze='decoder'"):
        trainable_entries(_onehot_reference(), {}, unfreeze="decoder")


def _train_extended(model, extension, codes, *, seed=0, epochs=3):
    n = codes.shape[0]
    if model.config.categorical_sizes:
        conditions = np.concatenate([codes.astype(np.float32), np.zeros((n, 1), np.float32)], axis=1)
    else:
        conditions = _onehot_conditions(codes, extension.new_sizes, np.zeros(n, np.float32))
    loader = MinibatchLoader(_counts(n, seed), conditions, batch_size=32, seed=seed)
    config = TrainConfig(epochs=epochs, weight_decay=0.0, lr=1e-2, progress=False, seed=seed, device="cpu")
    Trainer(model, config).fit(loader)


def _bits(tensor):
    return tensor.detach().contiguous().view(torch.int32) if tensor.dtype == torch.float32 else tensor.detach()


@pytest.mark.parametrize("encoding", ["onehot", "embedding"])
def test_freeze_trains_only_new_entries_bitwise(encoding):
    reference = _onehot_reference(dispersion="gene-condition") if encoding == "onehot" else _embedding_reference()
    extension = ConditionExtension(OLD, ADDED, n_continuous=1)
    model, extended = extend_conditions(reference, extension)
    freeze_reference(model, trainable_entries(model, extended))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    codes = np.stack([rng.integers(0, 5, 96), rng.integers(0, 3, 96)], axis=1)  # old and new categories
    _train_extended(model, extension, codes)
    after = model.state_dict()
    for name, old in reference.state_dict().items():
        if name in extended:
            spec = extended[name]
            kept = after[name].index_select(spec.axis, torch.as_tensor(spec.old_positions))
            assert torch.equal(_bits(kept), _bits(old)), name
            new = torch.as_tensor(spec.new_positions)
            moved = after[name].index_select(spec.axis, new) - start[name].index_select(spec.axis, new)
            assert moved.abs().amax(dim=1 - spec.axis).min() > 0, f"{name}: a new category did not learn"
        else:
            assert torch.equal(_bits(after[name]), _bits(old)), name  # weights, running stats, batch counters


def test_first_layer_unfreezes_the_encoder_input_layer_only():
    reference = _onehot_reference()
    extension = ConditionExtension(OLD, ADDED, n_continuous=1)
    model, extended = extend_conditions(reference, extension)
    freeze_reference(model, trainable_entries(model, extended, unfreeze="first_layer"))
    rng = np.random.default_rng(0)
    _train_extended(model, extension, np.stack([rng.integers(0, 5, 96), rng.integers(0, 3, 96)], axis=1))
    after, before = model.state_dict(), reference.state_dict()
    old_columns = torch.as_tensor(extended["encoder.layers.0.weight"].old_positions)
    assert not torch.equal(after["encoder.layers.0.weight"].index_select(1, old_columns), before["encoder.layers.0.weight"])
    assert not torch.equal(after["encoder.layers.0.bias"], before["encoder.layers.0.bias"])
    decoder_old = after["decoder.layers.0.weight"].index_select(1, torch.as_tensor(extended["decoder.layers.0.weight"].old_positions))
    assert torch.equal(decoder_old, before["decoder.layers.0.weight"])
    for name in ("encoder.layers.1.running_mean", "z_mean.weight", "head.scale.weight", "decoder.layers.1.weight"):
        assert torch.equal(after[name], before[name]), name


def test_unfreeze_all_trains_everything_with_batch_norm_statistics():
    reference = _onehot_reference()
    extension = ConditionExtension(OLD, ADDED, n_continuous=1)
    model, extended = extend_conditions(reference, extension)
    trainable = trainable_entries(model, extended, unfreeze="all")
    assert set(trainable) == {name for name, _ in model.named_parameters()}
    freeze_reference(model, trainable, freeze_norm_statistics=False)
    rng = np.random.default_rng(0)
    _train_extended(model, extension, np.stack([rng.integers(0, 5, 96), rng.integers(0, 3, 96)], axis=1))
    after, before = model.state_dict(), reference.state_dict()
    for name in ("z_mean.weight", "head.scale.weight", "encoder.layers.1.running_mean"):
        assert not torch.equal(after[name], before[name]), name


def test_training_stages_put_the_decoder_side_first_and_split_the_entries():
    extension = ConditionExtension(OLD, ADDED, n_continuous=1)
    model, extended = extend_conditions(_onehot_reference(dispersion="gene-condition"), extension)
    for unfreeze in ("new_categories", "first_layer", "encoder"):
        stages = training_stages(model, extended, unfreeze=unfreeze)
        assert [name for name, _ in stages] == ["decoder", "encoder"]
        decoder, encoder = stages[0][1], stages[1][1]
        assert all(name.startswith(("encoder.", "z_mean.", "z_logvar.")) for name in encoder)
        assert "decoder.layers.0.weight" in decoder and any(name.startswith("head.") for name in decoder)
        merged = {**decoder, **encoder}
        expected = trainable_entries(model, extended, unfreeze=unfreeze)
        assert merged.keys() == expected.keys() and not decoder.keys() & encoder.keys()
        for name, mask in expected.items():
            assert (mask is None and merged[name] is None) or torch.equal(merged[name], mask), name
    encoder_stage = dict(training_stages(model, extended, unfreeze="encoder"))["encoder"]
    assert {"z_mean.weight", "z_logvar.bias", "encoder.layers.0.weight", "encoder.layers.1.weight"} <= set(encoder_stage)
    assert all(encoder_stage[name] is None for name in encoder_stage)  # whole tensors, the new columns with them
    assert [name for name, _ in training_stages(model, extended, unfreeze="all")] == ["all"]
    # one embedding row feeds both networks: nothing to split
    embedded, rows = extend_conditions(_embedding_reference(), extension)
    assert [name for name, _ in training_stages(embedded, rows)] == ["new_categories"]
    decoder_only, columns = extend_conditions(_onehot_reference(inject_condition="decoder"), extension)
    assert [name for name, _ in training_stages(decoder_only, columns)] == ["new_categories"]


def test_mutual_neighbours_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 5)), rng.normal(size=(60, 5))
    k = 5
    distances = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)  # (50, 60)
    a_to_b, b_to_a = np.argsort(distances, axis=1)[:, :k], np.argsort(distances.T, axis=1)[:, :k]
    expected = {(i, j) for i in range(50) for j in a_to_b[i] if i in b_to_a[j]}
    rows, columns = mutual_neighbours(torch.as_tensor(a), torch.as_tensor(b), k, chunk=16)
    assert set(zip(rows.tolist(), columns.tolist())) == expected and len(expected) > 50
    empty = mutual_neighbours(torch.as_tensor(a[:0]), torch.as_tensor(b), k)
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def test_mean_cluster_offset_matches_a_loop_over_the_query_cells():
    rng = np.random.default_rng(1)
    query, reference = rng.normal(size=(30, 4)), rng.normal(size=(40, 4))
    clusters = rng.integers(0, 5, size=40)
    i, r = rng.integers(0, 25, size=120), rng.integers(0, 40, size=120)  # query rows 25-29 have no partner
    offsets = []
    for row in range(30):
        partners = clusters[r[i == row]]
        if partners.size:
            joined = np.argmax(np.bincount(partners, minlength=5))  # the lowest cluster on a tie, as argmax
            offsets.append(reference[clusters == joined].mean(0) - query[row])
    query, reference, clusters, i, r = (torch.as_tensor(a) for a in (query, reference, clusters, i, r))
    shift = cluster_offsets(query, reference, clusters, *joined_clusters(30, clusters, i, r)).mean(dim=0)
    np.testing.assert_allclose(shift.numpy(), np.mean(offsets, axis=0), rtol=1e-12)


def test_cluster_offset_recovers_a_shift_that_the_pairs_fall_short_of():
    """Three states (blobs of sd 1, centres ~6 apart) in the reference; the query draws new cells of
    the same states moved by a known shift of length 3. The mutual pairs' own offsets fall short of
    it (measured: 1.21 long, error 1.80), matching all means carries the composition of a query of
    one state (error 11.8), and the clusters the pairs point to recover it (errors 0.77 and 0.94)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 6
    reference = torch.as_tensor(np.concatenate([c + rng.normal(size=(300, 8)) for c in centres]))
    shift = rng.normal(size=8)
    shift *= 3 / np.linalg.norm(shift)
    clusters = kmeans_labels(reference, 18)
    assert torch.equal(clusters, kmeans_labels(reference, 18))  # seeded
    for states in ([0, 1, 2], [0]):
        query = torch.as_tensor(np.concatenate([centres[k] + rng.normal(size=(200, 8)) for k in states]) - shift)
        i, r = mutual_neighbours(query, reference, 20)
        pairs = np.linalg.norm((reference[r] - query[i]).mean(0).numpy() - shift)
        cells, joined = joined_clusters(query.shape[0], clusters, i, r)
        matched = np.linalg.norm(cluster_offsets(query, reference, clusters, cells, joined).mean(dim=0).numpy() - shift)
        means = np.linalg.norm((reference.mean(0) - query.mean(0)).numpy() - shift)
        assert pairs > 1.5 and matched < 1.0 and matched < pairs / 1.8, (states, pairs, matched)
        assert (means < 0.2) if len(states) == 3 else (means > 10 * matched), (states, means, matched)


def test_neighbours_start_gives_back_the_offset_of_a_shifted_copy():
    """Query cells that are reference cells of batch 0 under the new batch's label sit at the first
    batch norm exactly (new column - batch 0's column) from their reference copies; with one
    neighbour each way, every cell pairs with its copy and the new column becomes batch 0's. The
    shifted query is then its reference copy in the latent too, so it spreads there exactly as much
    (ratio 1) and ``refine_below`` below 1 does not refine it."""
    torch.manual_seed(0)
    config = ModelConfig(input_dim=G, latent_dim=L, condition_dim=2, hidden_dims=(16,), likelihood="nb")
    reference = ConditionalVAE.from_config(config).eval()
    model, extended = extend_conditions(reference, ConditionExtension((2,), (1,)))
    x = torch.from_numpy(_counts(40, 5))
    as_batch_0, as_new = torch.zeros(40, 3), torch.zeros(40, 3)
    as_batch_0[:, 0], as_new[:, 2] = 1.0, 1.0
    weight = model.encoder.layers[0].weight
    assert not torch.allclose(weight[:, G + 2], weight[:, G])  # it starts at the mean of batches 0 and 1
    (start,) = align_new_encoder_columns(model, extended, x, as_new, x, as_batch_0, n_neighbors=1, latent_steps=5, refine_below=0.99)
    assert start.pairs == 40 and start.latent_spread == pytest.approx(1.0, abs=1e-5) and not start.refined
    torch.testing.assert_close(weight[:, G + 2], weight[:, G], rtol=0, atol=1e-5)
    assert torch.equal(weight[:, : G + 2], reference.encoder.layers[0].weight)  # the reference columns stay


def test_latent_cluster_matching_reaches_the_least_squares_optimum_of_a_linear_encoder():
    """With latent = A h + b after the first layer, the best common shift u leaves A u equal to the
    cluster-weighted mean of d_k = goal_k - A(mean_k + shift) - b (A has full row rank), and the loss
    left is the weighted spread of the d_k around it: both from numpy, not from the optimiser."""
    rng = np.random.default_rng(2)
    hidden, latent, n = 12, 3, 90
    a, b = rng.normal(size=(latent, hidden)), rng.normal(size=latent)
    query = rng.normal(size=(n, hidden))
    joined = rng.choice([0, 3, 7], size=n)  # cluster numbers with gaps, as when some clusters get no query cell
    goals = 3 * rng.normal(size=(8, latent))
    shift, scale = rng.normal(size=hidden), rng.uniform(0.5, 2.0, size=hidden)
    as_tensor = torch.as_tensor
    refined = match_cluster_latents(lambda h: h @ as_tensor(a).T + as_tensor(b), as_tensor(query), as_tensor(goals[joined]),
                                    as_tensor(joined), as_tensor(shift), scale=as_tensor(scale)).numpy()  # fmt: skip
    clusters, weights = np.unique(joined, return_counts=True)
    residuals = np.stack([goals[k] - a @ (query[joined == k].mean(0) + shift) - b for k in clusters])  # (3, L)
    best = (weights[:, None] * residuals).sum(0) / n
    np.testing.assert_allclose(a @ (refined - shift), best, atol=1e-6)
    left = [np.sum((query[joined == k] + refined) @ a.T + b, axis=0) / w - goals[k] for k, w in zip(clusters, weights)]
    loss = sum(w * np.sum(r**2) for w, r in zip(weights, left)) / n
    assert abs(loss - sum(w * np.sum((r - best) ** 2) for w, r in zip(weights, residuals)) / n) < 1e-9


def test_joined_clusters_and_cluster_means_match_a_loop():
    rng = np.random.default_rng(3)
    reference, clusters = rng.normal(size=(40, 4)), rng.integers(0, 5, size=40)
    i, r = rng.integers(0, 25, size=120), rng.integers(0, 40, size=120)
    cells, joined = joined_clusters(30, torch.as_tensor(clusters), torch.as_tensor(i), torch.as_tensor(r))
    expected = [(row, np.argmax(np.bincount(clusters[r[i == row]], minlength=5))) for row in range(30) if (i == row).any()]
    assert list(zip(cells.tolist(), joined.tolist())) == expected
    means = cluster_means(torch.as_tensor(reference), torch.as_tensor(clusters)).numpy()
    np.testing.assert_allclose(means, [reference[clusters == k].mean(0) for k in range(5)], rtol=1e-12)


def test_within_cluster_spread_and_the_latent_spread_ratio_match_a_loop():
    """The root mean squared distance to the cluster mean, against numpy; the ratio takes the reference
    rows of the joined clusters only, and a query that is the reference scaled by 0.5 about each
    cluster mean spreads exactly half as much."""
    rng = np.random.default_rng(4)
    reference, clusters = rng.normal(size=(60, 3)), rng.integers(0, 6, size=60)
    squared = [np.sum((reference[clusters == k] - reference[clusters == k].mean(0)) ** 2, axis=1) for k in range(6)]
    expected = np.sqrt(np.concatenate(squared).mean())
    assert within_cluster_spread(torch.as_tensor(reference), torch.as_tensor(clusters)) == pytest.approx(expected, rel=1e-12)
    kept = clusters < 4  # the query joins clusters 0-3 only
    means = np.stack([reference[clusters == k].mean(0) for k in range(6)])
    query = means[clusters[kept]] + 0.5 * (reference[kept] - means[clusters[kept]])
    ratio = latent_spread_ratio(torch.as_tensor(query), torch.as_tensor(reference), torch.as_tensor(clusters), torch.as_tensor(clusters[kept]))
    assert ratio == pytest.approx(0.5, rel=1e-12)


def test_start_precision_is_the_paired_share_over_the_variance_of_the_per_cell_offsets():
    """P / (n_query var_j), var_j the variance of (joined cluster's reference mean - cell) over the P
    paired cells, against numpy: the per-cell weight of a Gaussian prior with the start's standard error."""
    rng = np.random.default_rng(5)
    query, reference = rng.normal(size=(30, 4)), rng.normal(size=(40, 4)) * [1.0, 2.0, 0.5, 3.0]
    clusters = rng.integers(0, 5, size=40)
    cells, joined = np.sort(rng.choice(30, size=24, replace=False)), rng.integers(0, 5, size=24)
    offsets = np.stack([reference[clusters == k].mean(0) for k in joined]) - query[cells]
    expected = 24 / 30 / offsets.var(axis=0, ddof=1)
    got = start_precision(cluster_offsets(*(torch.as_tensor(a) for a in (query, reference, clusters, cells, joined))), n_query=30)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_anchor_adds_the_gradient_of_a_gaussian_prior_on_the_new_columns_only():
    """After freeze_reference's mask, the gradient is the ELBO's plus precision * (w - start) on the
    trainable entries (autograd of the loss plus ½ Σ precision (w - start)², masked) and exactly zero on
    the frozen ones; one Adam step then leaves every frozen entry bitwise."""
    extension = ConditionExtension(OLD, ADDED, n_continuous=1)
    model, extended = extend_conditions(_onehot_reference(), extension)
    encoder = dict(training_stages(model, extended))["encoder"]
    name = "encoder.layers.0.weight"
    mask = encoder[name]
    weight = dict(model.named_parameters())[name]
    start = weight.detach().clone()
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * mask)  # moved off the start
    precision = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) * 5 * mask
    rng = np.random.default_rng(2)
    x = torch.as_tensor(_counts(64, 3))
    codes = np.stack([rng.integers(0, 5, 64), rng.integers(0, 3, 64)], axis=1)
    c = torch.as_tensor(_onehot_conditions(codes, tuple(o + a for o, a in zip(OLD, ADDED)), rng.normal(size=64)))

    def elbo_loss():
        torch.manual_seed(3)  # the same reparameterisation noise in both passes
        return model.loss(x, c).loss

    expected_loss = elbo_loss() + 0.5 * (precision * (weight - start) ** 2).sum()
    expected = torch.autograd.grad(expected_loss, weight)[0] * mask
    freeze_reference(model, encoder)
    anchor_to_start(weight, start, precision)
    model.zero_grad()
    elbo_loss().backward()
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(weight.grad[~mask], torch.zeros_like(weight.grad[~mask]))
    pull = precision * (weight.detach() - start)
    assert pull[mask].abs().max() > 0.1 * weight.grad[mask].abs().max()  # the pull is a real part of that gradient
    frozen = weight.detach()[~mask].clone()
    torch.optim.Adam([weight], lr=1e-2).step()
    assert torch.equal(_bits(weight.detach()[~mask]), _bits(frozen))
