"""Building blocks: covariate injection, encoder/decoder outputs, closed-form KL, LDVAE loadings."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from scvi_cli.models.outputs import gaussian_kl, gaussian_kl_to_standard, gaussian_log_prob
from scvi_cli.nn import DecoderSCVI, Encoder, FCLayers, LinearDecoderSCVI


def _linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("inject", [True, False])
def test_covariates_injected_into_first_and_later_layers(inject):
    decoder = DecoderSCVI(10, 30, n_cat_list=[3, 4, 1], n_layers=3, n_hidden=16, inject_covariates=inject)
    first, second, third = _linears(decoder.px_decoder)
    assert first.in_features == 10 + 3 + 4  # the 1-category covariate is dropped
    assert second.in_features == 16 + (7 if inject else 0)
    assert third.in_features == 16 + (7 if inject else 0)


def test_injection_uses_the_one_hot_codes():
    torch.manual_seed(0)
    layers = FCLayers(2, 5, n_cat_list=[3], n_layers=1, use_batch_norm=False, use_activation=False, dropout_rate=0)
    linear = layers.fc_layers[0][0]
    x = torch.randn(4, 2)
    codes = torch.tensor([[0], [1], [2], [1]])
    expected = x @ linear.weight[:, :2].T + linear.weight[:, 2:][:, codes.squeeze(1)].T + linear.bias
    torch.testing.assert_close(layers(x, codes), expected)


def test_fc_layer_slot_order_and_names():
    layers = FCLayers(8, 4, n_layers=2, n_hidden=6, use_batch_norm=True, use_layer_norm=True, dropout_rate=0.2)
    block = layers.fc_layers[0]
    assert isinstance(block[0], nn.Linear) and isinstance(block[1], nn.BatchNorm1d)
    assert isinstance(block[2], nn.LayerNorm) and isinstance(block[3], nn.ReLU) and isinstance(block[4], nn.Dropout)
    assert block[1].momentum == 0.01 and block[1].eps == 1e-3
    assert "fc_layers.Layer 1.1.running_var" in layers.state_dict()
    plain = FCLayers(8, 4, use_batch_norm=False, dropout_rate=0.0)
    assert [k for k in plain.state_dict()] == ["fc_layers.Layer 0.0.weight", "fc_layers.Layer 0.0.bias"]


def test_encoder_returns_mean_variance_and_sample():
    torch.manual_seed(0)
    enc = Encoder(12, 3, n_cat_list=[2], n_hidden=8).eval()
    x, batch = torch.randn(5, 12), torch.tensor([[0], [1], [0], [1], [1]])
    q_m, q_v, z = enc(x, batch)
    h = enc.encoder(x, batch)
    torch.testing.assert_close(q_m, enc.mean_encoder(h))
    torch.testing.assert_close(q_v, torch.exp(enc.var_encoder(h)) + 1e-4)
    assert z.shape == (5, 3) and not torch.equal(z, q_m)
    ln = Encoder(12, 3, distribution="ln", n_hidden=8).eval()
    _, _, z_ln = ln(x)
    torch.testing.assert_close(z_ln.sum(-1), torch.ones(5))
    softplus = Encoder(12, 3, var_activation=nn.functional.softplus, var_eps=0.5, n_hidden=8).eval()
    _, q_v2, _ = softplus(x)
    torch.testing.assert_close(q_v2, nn.functional.softplus(softplus.var_encoder(softplus.encoder(x))) + 0.5)


def test_decoder_outputs():
    torch.manual_seed(0)
    dec = DecoderSCVI(4, 20, n_cat_list=[3], n_hidden=8).eval()
    z, library, batch = torch.randn(6, 4), torch.log(torch.rand(6, 1) * 100 + 1), torch.randint(0, 3, (6, 1))
    px_scale, px_r, px_rate, px_dropout = dec("gene", z, library, batch)
    torch.testing.assert_close(px_scale.sum(-1), torch.ones(6))
    torch.testing.assert_close(px_rate, torch.exp(library) * px_scale)
    assert px_r is None and px_dropout.shape == (6, 20)
    _, px_r_cell, _, _ = dec("gene-cell", z, library, batch)
    torch.testing.assert_close(px_r_cell, dec.px_r_decoder(dec.px_decoder(z, batch)))
    soft = DecoderSCVI(4, 20, scale_activation="softplus").eval()
    scale, _, _, _ = soft("gene", z, library)
    assert torch.all(scale > 0) and not torch.allclose(scale.sum(-1), torch.ones(6))


def test_closed_form_kl_matches_torch_distributions():
    torch.manual_seed(0)
    q_m, q_v = torch.randn(7, 5), torch.rand(7, 5) + 0.1
    p_m, p_v = torch.randn(7, 5), torch.rand(7, 5) + 0.1
    ref_std = kl_divergence(Normal(q_m, q_v.sqrt()), Normal(torch.zeros(7, 5), torch.ones(7, 5)))
    torch.testing.assert_close(gaussian_kl_to_standard(q_m, q_v), ref_std)
    torch.testing.assert_close(gaussian_kl(q_m, q_v, p_m, p_v), kl_divergence(Normal(q_m, q_v.sqrt()), Normal(p_m, p_v.sqrt())))
    x = torch.randn(7, 5)
    torch.testing.assert_close(gaussian_log_prob(x, q_m, q_v), Normal(q_m, q_v.sqrt()).log_prob(x))


def test_linear_decoder_loadings_fold_batch_norm():
    torch.manual_seed(0)
    dec = LinearDecoderSCVI(3, 7, n_cat_list=[2])
    bn = dec.factor_regressor.fc_layers[0][1]
    with torch.no_grad():
        bn.weight.copy_(torch.rand(7) + 0.5)
        bn.running_var.copy_(torch.rand(7) + 0.2)
    W = dec.factor_regressor.fc_layers[0][0].weight.detach().numpy()
    assert W.shape == (7, 3 + 2)
    gamma, var = bn.weight.detach().numpy(), bn.running_var.numpy()
    expected = np.diag(gamma / np.sqrt(var + 1e-3)) @ W[:, :3]
    np.testing.assert_allclose(dec.loadings().numpy(), expected, rtol=1e-6)
    # In eval mode the pre-softmax change per unit of z_k is exactly the k-th loading column.
    dec.eval()
    z = torch.zeros(1, 3)
    e0 = torch.tensor([[1.0, 0.0, 0.0]])
    batch = torch.zeros(1, 1, dtype=torch.long)
    diff = dec.factor_regressor(z + e0, batch) - dec.factor_regressor(z, batch)
    np.testing.assert_allclose(diff[0].detach().numpy(), expected[:, 0], rtol=1e-5, atol=1e-6)
    no_bn = LinearDecoderSCVI(3, 7, use_batch_norm=False)
    torch.testing.assert_close(no_bn.loadings(), no_bn.factor_regressor.fc_layers[0][0].weight)


def test_scale_head_over_all_genes_uses_the_whole_layer():
    """px_scale over all genes (what training computes) is the layer itself: no slice of its
    weight, whose backward would scatter the gradient into a zero-filled copy of all rows."""
    from scvi_cli.nn.decoders import DecoderSCVI, all_rows

    assert all_rows(slice(None), 7) and all_rows(slice(0, 7), 7) and all_rows(slice(0, 99), 7)
    assert not all_rows(slice(1, 7), 7) and not all_rows(slice(0, 7, 2), 7) and not all_rows(torch.arange(7), 7)
    torch.manual_seed(0)
    decoder = DecoderSCVI(4, 30)
    z = torch.randn(5, 4)
    px_scale = decoder("gene", z, torch.zeros(5, 1), torch.zeros(5, 1, dtype=torch.long))[0]
    seen, stack = set(), [px_scale.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert not any("Slice" in type(node).__name__ for node in seen)
    linear = decoder.px_scale_decoder[0]
    h = decoder.px_decoder(z, torch.zeros(5, 1, dtype=torch.long))
    torch.testing.assert_close(px_scale, torch.softmax(linear(h), dim=-1))


def test_training_dropout_mask_rate_scale_gradient_and_seed():
    """FCLayers' dropout: zeros with probability p, survivors scaled by 1/(1-p) (so the mean is
    kept), the gradient is the same mask, a seed repeats it, eval mode is the identity."""
    from scvi_cli.nn.fc_layers import dropout

    x = torch.full((400, 500), 2.0, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.1)
    kept = y != 0
    rate = 1 - kept.double().mean().item()
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / y.numel()) ** 0.5  # within 4 standard errors
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    torch.manual_seed(3)
    assert torch.equal(dropout(x.detach(), 0.1), y.detach())
    assert torch.equal(dropout(x.detach(), 0.0), x.detach()) and not dropout(x.detach(), 1.0).any()
    layers = FCLayers(5, 4, n_hidden=4, dropout_rate=0.5)
    layers.eval()
    h = torch.randn(8, 5)
    torch.testing.assert_close(layers(h), layers(h))
