"""Query mapping (`scvi-cli map`): the surgery, the freezing, the command, and label transfer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_cli.apply.integration import knn_vote, label_purity, mixing_entropy, nearest_neighbors, proportions_entropy
from scvi_cli.checkpoint import load_checkpoint
from scvi_cli.data.minibatch import Minibatch
from scvi_cli.models import LDVAE, VAE
from scvi_cli.training.mapping import QueryOptions, column_map, freeze_for_query, graft

from conftest import DATA_DIR, PBMC_SMALL


# --------------------------------------------------------------------------------------------
# Surgery on tiny modules


def _minibatch(n, genes, batch_codes, cat_codes=None, cont=None, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.poisson(2.0, size=(n, genes)).astype(np.float32))
    return Minibatch(
        x=x,
        batch_index=torch.as_tensor(batch_codes, dtype=torch.int64).reshape(-1, 1),
        labels=torch.zeros(n, 1, dtype=torch.int64),
        cat_covs=None if cat_codes is None else torch.as_tensor(cat_codes, dtype=torch.int64).reshape(n, -1),
        cont_covs=None if cont is None else torch.as_tensor(cont, dtype=torch.float32).reshape(n, -1),
    )


def _pair(n_batch_old, n_batch_new, cats_old=(), cats_new=(), **options):
    options.setdefault("use_observed_lib_size", True)
    torch.manual_seed(0)
    common = dict(n_input=30, n_hidden=16, n_latent=4, **options)
    ref = VAE(n_batch=n_batch_old, n_cats_per_cov=list(cats_old), **common)
    priors = {}
    if not options["use_observed_lib_size"]:
        priors = dict(library_log_means=np.zeros((1, n_batch_new)), library_log_vars=np.ones((1, n_batch_new)))
        ref = VAE(n_batch=n_batch_old, n_cats_per_cov=list(cats_old), library_log_means=np.zeros((1, n_batch_old)),
                  library_log_vars=np.ones((1, n_batch_old)), **common)
    torch.manual_seed(1)
    new = VAE(n_batch=n_batch_new, n_cats_per_cov=list(cats_new), **common, **priors)
    graft(ref, new, [n_batch_old, *cats_old], [n_batch_new, *cats_new])
    return ref.eval(), new.eval()


def test_column_map_places_old_columns_before_new_ones_in_each_block():
    # base 3 columns, batch 2 -> 4, covariate 3 -> 3
    positions, is_new = column_map(3 + 4 + 3, [2, 3], [4, 3])
    assert positions.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    assert np.flatnonzero(is_new).tolist() == [5, 6]
    # a one-category reference has no batch columns: the first new-layer column is its category
    positions, is_new = column_map(3 + 3, [1], [3])
    assert positions.tolist() == [0, 1, 2]
    assert np.flatnonzero(is_new).tolist() == [4, 5]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(encode_covariates=True, deeply_inject_covariates=True, n_layers=2),
        dict(use_observed_lib_size=False, dispersion="gene-batch", n_continuous_cov=1, encode_covariates=True),
    ],
)
def test_grafted_module_reproduces_the_reference_on_reference_cells(options):
    n_cont = options.get("n_continuous_cov", 0)
    ref, new = _pair(2, 4, cats_old=(3,), cats_new=(5,), **options)
    batch = _minibatch(12, 30, [0, 1] * 6, cat_codes=[0, 1, 2] * 4, cont=np.linspace(0, 1, 12) if n_cont else None)
    torch.manual_seed(3)
    z_ref = ref.latent(batch)
    torch.manual_seed(3)
    z_new = new.latent(batch)
    assert torch.equal(z_ref, z_new)
    with torch.no_grad():
        out_ref = ref.generative(z_ref, torch.ones(12, 1) * 7, batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels)
        out_new = new.generative(z_ref, torch.ones(12, 1) * 7, batch.batch_index, batch.cont_covs, batch.cat_covs, batch.labels)
    torch.testing.assert_close(out_new["px_scale"], out_ref["px_scale"], rtol=0, atol=0)
    torch.testing.assert_close(out_new["px_r"], out_ref["px_r"], rtol=0, atol=0)


def test_single_batch_reference_gets_a_zero_column_and_decodes_as_before():
    ref, new = _pair(1, 3)
    weight = new.decoder.px_decoder.fc_layers[0][0].weight
    assert weight.shape[1] == 4 + 3
    assert torch.all(weight[:, 4] == 0)  # the reference's one category
    assert torch.any(weight[:, 5:] != 0)  # fresh columns for the new ones
    batch = _minibatch(6, 30, [0] * 6)
    z = ref.latent(batch)
    with torch.no_grad():
        a = ref.generative(z, torch.ones(6, 1), batch.batch_index, None, None, batch.labels)["px_scale"]
        b = new.generative(z, torch.ones(6, 1), batch.batch_index, None, None, batch.labels)["px_scale"]
    assert torch.equal(a, b)


def _train_query_steps(module, batch, steps=5):
    module.train()
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2, eps=0.01, weight_decay=0)
    for _ in range(steps):
        optimizer.zero_grad()
        module.loss_for(batch).loss.backward()
        optimizer.step()


def test_default_freezing_moves_only_new_columns_and_decoder_batch_norm():
    ref, new = _pair(2, 4, cats_old=(3,), cats_new=(3,), dispersion="gene-batch", encode_covariates=True)
    before = {k: v.clone() for k, v in new.state_dict().items()}
    trained, held_norms, hooks = freeze_for_query(new, QueryOptions(), [2, 3])
    assert len(held_norms) == 3  # every batch norm normalises with the reference's statistics
    new.train()
    assert not any(norm.training for norm in held_norms) and new.decoder.px_decoder.fc_layers[0][4] is None
    # query cells: new batches 2 and 3, and covariate values the reference knows
    batch = _minibatch(16, 30, [2, 3] * 8, cat_codes=[0, 1, 2, 0] * 4, seed=5)
    module_grads = {}
    new.train()
    new.loss_for(batch).loss.backward()
    for name, param in new.named_parameters():
        module_grads[name] = None if param.grad is None else param.grad.clone()
        param.grad = None
    _train_query_steps(new, batch)
    after = new.state_dict()
    layer = "decoder.px_decoder.fc_layers.Layer 0.0.weight"  # columns: z 4, batch 4, covariate 3
    positions, is_new = column_map(after[layer].shape[1], [2, 3], [4, 3])
    assert np.flatnonzero(is_new).tolist() == [6, 7]
    assert torch.equal(after[layer][:, ~torch.as_tensor(is_new)], before[layer][:, ~torch.as_tensor(is_new)])
    assert not torch.equal(after[layer][:, 6:8], before[layer][:, 6:8])
    assert torch.all(module_grads[layer][:, ~torch.as_tensor(is_new)] == 0)
    # px_r: the reference's batches frozen, the new ones learn
    assert torch.equal(after["px_r"][:, :2], before["px_r"][:, :2])
    assert not torch.equal(after["px_r"][:, 2:], before["px_r"][:, 2:])
    # the decoder's batch norm learns its scale and shift; no statistics move; the encoders' stay
    assert not torch.equal(after["decoder.px_decoder.fc_layers.Layer 0.1.weight"], before["decoder.px_decoder.fc_layers.Layer 0.1.weight"])
    for name in ("z_encoder.encoder.fc_layers.Layer 0.1.running_mean", "z_encoder.encoder.fc_layers.Layer 0.1.weight",
                 "decoder.px_decoder.fc_layers.Layer 0.1.running_mean", "decoder.px_decoder.fc_layers.Layer 0.1.running_var",
                 "decoder.px_decoder.fc_layers.Layer 0.1.num_batches_tracked"):
        assert torch.equal(after[name], before[name]), name
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    allowed = {layer, "px_r", "z_encoder.encoder.fc_layers.Layer 0.0.weight", "l_encoder.encoder.fc_layers.Layer 0.0.weight"}
    allowed |= {"decoder.px_decoder.fc_layers.Layer 0.1.weight", "decoder.px_decoder.fc_layers.Layer 0.1.bias"}
    assert changed <= allowed
    # the encoders read covariates: only their new batch columns moved
    enc = "z_encoder.encoder.fc_layers.Layer 0.0.weight"
    _, enc_new = column_map(after[enc].shape[1], [2, 3], [4, 3])
    assert torch.equal(after[enc][:, ~torch.as_tensor(enc_new)], before[enc][:, ~torch.as_tensor(enc_new)])
    assert set(trained) >= {layer + " [new columns]", "px_r [new columns]"}
    assert "decoder.px_scale_decoder.0.weight" not in trained
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize(
    "options, free",
    [
        (QueryOptions(unfrozen=True), "decoder.px_scale_decoder.0.weight"),
        (QueryOptions(freeze_decoder_first_layer=False), "decoder.px_decoder.fc_layers.Layer 0.0.bias"),
        (QueryOptions(freeze_expression=False), "z_encoder.encoder.fc_layers.Layer 0.0.weight"),
        (QueryOptions(freeze_batchnorm_encoder=False), "z_encoder.encoder.fc_layers.Layer 0.1.weight"),
    ],
)
def test_switches_unfreeze_what_they_name(options, free):
    _, new = _pair(2, 3)
    trained, _, hooks = freeze_for_query(new, options, [2])
    assert free in trained
    assert dict(new.named_parameters())[free].requires_grad
    before = dict(new.named_parameters())[free].detach().clone()
    _train_query_steps(new, _minibatch(16, 30, [2] * 16))
    assert not torch.equal(dict(new.named_parameters())[free], before)
    for hook in hooks:
        hook.remove()


def test_frozen_batchnorm_decoder_and_dropout_switches():
    _, new = _pair(2, 3)
    trained, held, hooks = freeze_for_query(new, QueryOptions(freeze_batchnorm_decoder=True, freeze_dropout=True), [2])
    assert all(not name.startswith("decoder.px_decoder.fc_layers.Layer 0.1") for name in trained)
    assert not any(p.requires_grad for n, p in new.named_parameters() if ".1." in n)
    assert all(m.p == 0 for m in new.modules() if isinstance(m, torch.nn.Dropout))
    for hook in hooks:
        hook.remove()


def test_ldvae_surgery_keeps_loadings():
    torch.manual_seed(0)
    ref = LDVAE(30, n_batch=2, n_hidden=16, n_latent=4, use_observed_lib_size=True).eval()
    torch.manual_seed(1)
    new = LDVAE(30, n_batch=3, n_hidden=16, n_latent=4, use_observed_lib_size=True)
    graft(ref, new, [2], [3])
    before = {k: v.clone() for k, v in new.state_dict().items()}
    trained, _, _ = freeze_for_query(new, QueryOptions(), [2])
    _train_query_steps(new, _minibatch(16, 30, [2] * 16))
    after = new.state_dict()
    w = "decoder.factor_regressor.fc_layers.Layer 0.0.weight"
    assert torch.equal(after[w][:, :6], before[w][:, :6])  # loadings (4) and the two reference batches
    assert not torch.equal(after[w][:, 6], before[w][:, 6])
    assert torch.equal(after[w][:, :4], ref.state_dict()[w][:, :4])


# --------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """pbmc_small split by its two (artificial) batches: reference g2, query g1."""
    root = tmp_path_factory.mktemp("mapping")
    adata = ad.read_h5ad(PBMC_SMALL)
    batch = adata.obs["batch"].astype(str)
    adata[batch == "g2"].copy().write_h5ad(root / "ref.h5ad")
    adata[batch == "g1"].copy().write_h5ad(root / "query.h5ad")
    return root


@pytest.fixture(scope="module")
def reference(split):
    from scvi_cli.cli import main

    two = ad.read_h5ad(split / "ref.h5ad")
    # two reference batches (random halves of g2), so the surgery extends real columns
    two.obs["batch"] = np.where(np.arange(two.n_obs) % 2 == 0, "g2a", "g2b")
    two.write_h5ad(split / "ref2.h5ad")
    with pytest.raises(SystemExit) as done:
        main(["train", str(split / "ref2.h5ad"), "--out", str(split / "ref.ckpt"), "--set", "data.batch_key=batch",
              "--set", "data.labels_key=cell_type", "--set", "train.max_epochs=3", "-q"])
    assert done.value.code == 0
    return split / "ref.ckpt"


def test_map_end_to_end(run_cli, split, reference, tmp_path):
    out = tmp_path / "q.ckpt"
    code, _, err = run_cli("map", reference, split / "query.h5ad", "--out", out, "--set", "train.max_epochs=3")
    assert code == 0, err
    assert "new categories appended after the reference's (batch: 'g1')" in err
    ref_ckpt, q_ckpt = load_checkpoint(reference), load_checkpoint(out)
    assert q_ckpt.categories["batch"] == ["g2a", "g2b", "g1"]
    mapping = q_ckpt.training["mapping"]
    assert mapping["reference_fingerprint"] == ref_ckpt.training["fingerprint"]
    assert mapping["new_categories"] == {"batch": ["g1"]}
    assert "decoder.px_decoder.fc_layers.Layer 0.0.weight [new columns]" in mapping["trained"]
    assert q_ckpt.spec["train"]["weight_decay"] == 0.0
    # frozen means frozen: every reference tensor but the decoder's batch-norm scale and shift is
    # bit-identical (its statistics and batch count included)
    for name, old in ref_ckpt.state_dict.items():
        new = q_ckpt.state_dict[name]
        if name in ("decoder.px_decoder.fc_layers.Layer 0.1.weight", "decoder.px_decoder.fc_layers.Layer 0.1.bias"):
            assert not torch.equal(new, old)
            continue
        if name == "decoder.px_decoder.fc_layers.Layer 0.0.weight":
            new = new[:, : old.shape[1]]  # z (10) then the two reference batches; g1's column is last
        assert torch.equal(new, old), name
    code, _, err = run_cli("info", out)
    assert code == 0 and "mapped onto reference" in _ + err
    # the mapped model serves reference and query cells alike; reference latents are unchanged
    for data in (split / "ref2.h5ad", split / "query.h5ad"):
        code, _, err = run_cli("embed", out, data, "--out", tmp_path / f"{data.stem}.npy", "-q")
        assert code == 0, err
    run_cli("embed", reference, split / "ref2.h5ad", "--out", tmp_path / "ref_before.npy", "-q")
    assert np.array_equal(np.load(tmp_path / "ref2.npy"), np.load(tmp_path / "ref_before.npy"))
    for args in (("impute", out, split / "query.h5ad", "--out", tmp_path / "imp.npy"),
                 ("sample", out, split / "query.h5ad", "--out", tmp_path / "s.h5ad"),
                 ("evaluate", out, split / "query.h5ad")):
        code, _, err = run_cli(*args, "-q") if args[0] != "evaluate" else run_cli(*args)
        assert code == 0, (args[0], err)


def test_mapped_model_ignores_the_labels_a_query_carries(run_cli, split, reference, tmp_path):
    """The reference was trained with a labels key its model does not use: query files with NaN or
    unseen labels in that column are embedded and labelled all the same."""
    out = tmp_path / "q.ckpt"
    assert run_cli("map", reference, split / "query.h5ad", "--out", out, "--set", "train.max_epochs=1", "-q")[0] == 0
    query = ad.read_h5ad(split / "query.h5ad")
    query.obs["cell_type"] = pd.Categorical(["C"] * 10 + [None] * (query.n_obs - 10))
    query.write_h5ad(tmp_path / "odd_labels.h5ad")
    ref = ad.read_h5ad(split / "ref2.h5ad")
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(object)
    ref.obs.iloc[:5, ref.obs.columns.get_loc("cell_type")] = None
    ref.write_h5ad(tmp_path / "ref_some_unlabelled.h5ad")
    assert run_cli("embed", out, tmp_path / "odd_labels.h5ad", "--out", tmp_path / "z.npy", "-q")[0] == 0
    code, _, err = run_cli("transfer-labels", "--reference", tmp_path / "ref_some_unlabelled.h5ad", "--query",
                           tmp_path / "odd_labels.h5ad", "--model", out, "--labels-key", "cell_type", "--out", tmp_path / "p.csv")
    assert code == 0, err
    assert "(5 without a label left out)" in err


def test_transfer_labels_end_to_end_matches_a_hand_vote(run_cli, split, reference, tmp_path):
    out = tmp_path / "q.ckpt"
    assert run_cli("map", reference, split / "query.h5ad", "--out", out, "--set", "train.max_epochs=2", "-q")[0] == 0
    for ext in ("csv", "tsv", "parquet", "h5ad"):
        code, _, err = run_cli(
            "transfer-labels", "--reference", split / "ref2.h5ad", "--query", split / "query.h5ad", "--model", out,
            "--labels-key", "cell_type", "--k", "5", "--out", tmp_path / f"pred.{ext}",
        )
        assert code == 0, err
    assert "agreement with the query's own obs['cell_type']" in err
    table = pd.read_csv(tmp_path / "pred.csv", index_col=0)
    assert list(table.columns) == ["predicted", "vote_share", "uncertainty"]
    pd.testing.assert_frame_equal(table, pd.read_parquet(tmp_path / "pred.parquet").set_index("obs_names"), check_dtype=False)
    h5 = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert list(h5.obs["predicted"]) == list(table["predicted"])
    # by hand: Euclidean distances to every reference cell, the 5 nearest, a majority vote
    run_cli("embed", out, split / "ref2.h5ad", "--out", tmp_path / "r.npy", "-q")
    run_cli("embed", out, split / "query.h5ad", "--out", tmp_path / "q.npy", "-q")
    ref_z, q_z = np.load(tmp_path / "r.npy"), np.load(tmp_path / "q.npy")
    labels = ad.read_h5ad(split / "ref2.h5ad").obs["cell_type"].astype(str).to_numpy()
    for i in range(len(q_z)):
        order = np.argsort(((ref_z - q_z[i]) ** 2).sum(1), kind="stable")[:5]
        votes = pd.Series(labels[order]).value_counts()
        top = votes[votes == votes.max()].index
        expected = next(lab for lab in labels[order] if lab in top)
        assert table["predicted"].iloc[i] == expected
        assert table["vote_share"].iloc[i] == pytest.approx(votes.max() / 5)
    np.testing.assert_allclose(table["uncertainty"], 1 - table["vote_share"])


def test_map_query_without_new_batch_is_mapped_as_is(run_cli, split, reference, tmp_path):
    out = tmp_path / "same.ckpt"
    code, _, err = run_cli("map", reference, split / "ref2.h5ad", "--out", out)
    assert code == 0, err
    assert "no 'batch' values new to the reference: it is mapped as is, nothing is trained" in err
    ref_ckpt, q_ckpt = load_checkpoint(reference), load_checkpoint(out)
    assert all(torch.equal(ref_ckpt.state_dict[k], v) for k, v in q_ckpt.state_dict.items())
    assert q_ckpt.training["mapping"]["trained"] == []


def test_map_bad_inputs(run_cli, split, reference, tmp_path):
    query = ad.read_h5ad(split / "query.h5ad")
    del query.obs["batch"]
    query.write_h5ad(tmp_path / "nobatch.h5ad")
    code, _, err = run_cli("map", reference, tmp_path / "nobatch.h5ad", "--out", tmp_path / "x.ckpt")
    assert code == 1 and "obs has no column 'batch' (data.batch_key)" in err
    assert not (tmp_path / "x.ckpt").exists()

    code, _, err = run_cli("map", reference, split / "query.h5ad", "--out", tmp_path / "x.ckpt", "--set", "model.n_latent=3")
    assert code == 2 and "only train.*, data.layer and data.backed can be set" in err
    code, _, err = run_cli("map", reference, split / "query.h5ad", "--out", tmp_path / "x.ckpt", "--set", "train.weight_decay=0.1")
    assert code == 2 and "without weight decay" in err

    few = ad.read_h5ad(split / "query.h5ad")[:, 5:].copy()
    few.write_h5ad(tmp_path / "few.h5ad")
    code, _, err = run_cli("map", reference, tmp_path / "few.h5ad", "--out", tmp_path / "x.ckpt")
    assert code == 1 and "missing" in err and not (tmp_path / "x.ckpt").exists()
    code, _, err = run_cli("map", reference, tmp_path / "few.h5ad", "--out", tmp_path / "x.ckpt",
                           "--allow-missing-genes", "--set", "train.max_epochs=1", "-q")
    assert code == 0, err

    cond = tmp_path / "cond.ckpt"
    assert run_cli("train", split / "ref2.h5ad", "--out", cond, "--set", "model.type=condscvi",
                   "--set", "data.labels_key=cell_type", "--set", "train.max_epochs=1", "-q")[0] == 0
    code, _, err = run_cli("map", cond, split / "query.h5ad", "--out", tmp_path / "x.ckpt")
    assert code == 1 and "holds a condscvi model" in err and "CondSCVI" in err


def test_map_an_imported_scvi_tools_model(run_cli, tmp_path):
    models = DATA_DIR / "scvi_tools_models"
    imported = tmp_path / "imported.ckpt"
    assert run_cli("import-model", models / "scvi", "--out", imported)[0] == 0
    adata = ad.read_h5ad(models / "cells.h5ad")
    ckpt = load_checkpoint(imported)
    key = ckpt.spec["data"]["batch_key"]
    adata.obs[key] = "new_site"
    adata.write_h5ad(tmp_path / "query.h5ad")
    code, _, err = run_cli("map", imported, tmp_path / "query.h5ad", "--out", tmp_path / "q.ckpt", "--set", "train.max_epochs=2")
    assert code == 0, err
    assert load_checkpoint(tmp_path / "q.ckpt").categories["batch"][-1] == "new_site"


# --------------------------------------------------------------------------------------------
# Neighbourhood statistics


def test_knn_vote_majority_and_nearest_tie_break():
    codes = np.array([[0, 1, 1, 2, 0], [2, 1, 0, 1, 0], [1, 1, 1, 1, 1]])
    winner, share = knn_vote(codes, 3)
    # row 0: 0 and 1 tie at 2 votes, the nearest (0) wins; row 1: 1 and 0 tie, 1 is nearer
    assert winner.tolist() == [0, 1, 1]
    np.testing.assert_allclose(share, [0.4, 0.4, 1.0])


def test_nearest_neighbors_against_brute_force():
    rng = np.random.default_rng(0)
    ref, query = rng.normal(size=(300, 6)), rng.normal(size=(70, 6))
    d, i = nearest_neighbors(ref, query, 7)
    full = np.sqrt(((query[:, None, :] - ref[None]) ** 2).sum(-1))
    expected = np.argsort(full, axis=1)[:, :7]
    assert np.array_equal(i, expected)
    np.testing.assert_allclose(d, np.take_along_axis(full, expected, 1))
    _, own = nearest_neighbors(ref, ref, 4, exclude_self=True)
    assert not (own == np.arange(300)[:, None]).any()


def test_mixing_and_purity_by_hand():
    # two far-apart clusters: by batch a perfect split, by label perfectly pure
    latent = np.concatenate([np.zeros((20, 2)), np.full((20, 2), 100.0)]) + np.random.default_rng(1).normal(0, 0.01, (40, 2))
    sides = np.repeat(["a", "b"], 20)
    assert mixing_entropy(latent, sides, k=10) == pytest.approx(0.0)
    assert label_purity(latent, sides, k=10) == pytest.approx(1.0)
    # alternate groups within each cluster: neighbourhoods are about half and half
    alternating = np.tile(["x", "y"], 20)
    value = mixing_entropy(latent, alternating, k=19)
    p = np.array([9 / 19, 10 / 19])  # 19 other cells of a cluster of 20: 9 of one's own group, 10 of the other
    assert value == pytest.approx(-(p * np.log(p)).sum() / np.log(2))
    assert proportions_entropy(["a", "a", "a", "b"]) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(2))


def test_map_an_ldvae_reference_keeps_its_loadings(run_cli, split, reference, tmp_path):
    ref = tmp_path / "ldvae.ckpt"
    assert run_cli("train", split / "ref2.h5ad", "--out", ref, "--set", "model.type=ldvae", "--set", "data.batch_key=batch",
                   "--set", "train.max_epochs=2", "-q")[0] == 0
    out = tmp_path / "q.ckpt"
    code, _, err = run_cli("map", ref, split / "query.h5ad", "--out", out, "--set", "train.max_epochs=2")
    assert code == 0, err
    before, after = load_checkpoint(ref).state_dict, load_checkpoint(out).state_dict
    w = "decoder.factor_regressor.fc_layers.Layer 0.0.weight"
    assert after[w].shape[1] == before[w].shape[1] + 1
    assert torch.equal(after[w][:, : before[w].shape[1]], before[w])  # loadings and reference batches
    assert not torch.equal(after[w][:, -1], torch.zeros_like(after[w][:, -1]))


def test_interrupted_map_resumes_to_the_uninterrupted_weights(split, reference, tmp_path, monkeypatch):
    import os
    import signal

    from scvi_cli.progress import SilentReporter
    from scvi_cli.training.job import resume_path_for
    from scvi_cli.training.mapping import map_query
    from scvi_cli.training.preemption import TrainingStopped

    class StopAfterFirstEpoch(SilentReporter):
        def epoch(self, epoch, metrics):
            if epoch == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    settings = ["train.max_epochs=3", "train.batch_size=16"]
    whole = map_query(reference, split / "query.h5ad", tmp_path / "whole.ckpt", overrides=settings, threads=1)
    out = tmp_path / "q.ckpt"
    with pytest.raises(TrainingStopped):
        map_query(reference, split / "query.h5ad", out, overrides=settings, threads=1, reporter=StopAfterFirstEpoch())
    assert resume_path_for(out).exists() and not out.exists()
    # the reference spelled another way (relative, from another directory) is the same reference
    monkeypatch.chdir(reference.parent)
    map_query(reference.name, split / "query.h5ad", out, overrides=settings, threads=1, resume=True)
    a, b = load_checkpoint(out), load_checkpoint(whole.checkpoint_path)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in b.state_dict)
    assert a.training["mapping"]["reference"] == "ref.ckpt"  # recorded as given
    assert {k: v for k, v in a.training["mapping"].items() if k != "reference"} == {
        k: v for k, v in b.training["mapping"].items() if k != "reference"}
