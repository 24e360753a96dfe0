"""One test file for every script: tiny end-to-end CPU runs, tricky math against brute force, and masks.
Ordered like the README: each model's end-to-end run with its math beside it, then data, then the tests of
runs a user can trust (interrupts, refusals, messages) at the end.

Run:  python -m pytest -q test_models.py      (on the CPU whatever the machine has; see README, tests)
Tests make their own tiny data; nothing is downloaded.
"""
import json
import math
import os
import pickle
import shlex
import struct
import subprocess
import sys
import types

import matplotlib.figure
import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

import common
import vae_2d
import vae_image
import vlae
import vqvae
import pixelcnn_prior


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """--device auto means the CPU here, on a GPU box or a Mac too: the suite checks the math, on the CPU."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)


DRAWN = {'test_vae_2d_end_to_end', 'test_image_vae_end_to_end', 'test_vqvae_then_priors_end_to_end'}


@pytest.fixture(autouse=True)
def pictures_drawn_only_end_to_end(request, monkeypatch):
    """The end-to-end tests (DRAWN) draw every picture and check it is a PNG. The others test files, checkpoints
    and numbers: there a picture is an empty file, as drawing them took half the suite's time."""
    if request.function.__name__ not in DRAWN:
        monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', lambda fig, path, **kw: open(path, 'wb').close())
        monkeypatch.setattr(matplotlib.figure.Figure, 'tight_layout', lambda fig, **kw: None)


def is_png(path):
    with open(path, 'rb') as f:
        return f.read(8) == b'\x89PNG\r\n\x1a\n'


def read_metrics(out):
    with open(os.path.join(out, 'metrics.json')) as f:
        return json.load(f)


def write_pkl(path, train, test, **extra):
    with open(path, 'wb') as f:
        pickle.dump({'train': train, 'test': test, **extra}, f)


@pytest.fixture(scope='session')
def image_dir(tmp_path_factory):
    """A tiny cifar10.pkl and mnist.pkl in the data.zip format: one shared blocky pattern plus per-image
    blocky noise, seeded. The shared pattern gives a model something to learn within a few steps."""
    d = tmp_path_factory.mktemp('data')
    rng = np.random.default_rng(0)

    def images(n, size, channels):
        low = rng.uniform(0, 255, (1, 4, 4, channels)) + rng.normal(0, 30, (n, 4, 4, channels))
        big = np.kron(low, np.ones((1, size // 4, size // 4, 1)))  # (n, 4, 4, C) -> (n, size, size, C)
        return big.clip(0, 255).astype(np.uint8)

    write_pkl(d / 'cifar10.pkl', images(64, 32, 3), images(16, 32, 3))
    write_pkl(d / 'mnist.pkl', images(64, 28, 1)[..., 0], images(16, 28, 1)[..., 0])
    return str(d)


# -------------------------------------------------------------------------------------------------- 1. vae_2d

def test_vae_2d_end_to_end(tmp_path):
    out = str(tmp_path / 'run')
    vae_2d.main(['--epochs', '3', '--subset', '2000', '--out', out, '--iw-samples', '20'])
    for name in ('samples.png', 'curves.png', 'kl_per_dim.png'):
        assert is_png(os.path.join(out, name)), name
    m = read_metrics(out)
    assert m['test_history']['neg_elbo'][-1] < m['test_history']['neg_elbo'][0]
    assert set(m['final_test']) >= {'neg_elbo', 'recon', 'kl', 'nll_iw', 'active_units'}
    assert m['train_examples_per_s'] > 0 and m['script'] == 'vae_2d'
    ckpt = torch.load(os.path.join(out, 'model.pt'), weights_only=True)
    model = vae_2d.VAE2d(ckpt['config']['hidden'])  # the checkpoint alone rebuilds the model
    model.load_state_dict(ckpt['model'])


def test_2d_data_is_seeded_and_shaped():
    train, test = common.load_2d('gaussian1')
    assert train.shape == (10_000, 2) and test.shape == (2_500, 2)
    assert torch.equal(train, common.load_2d('gaussian1')[0])
    cov = torch.cov(train.T)  # rotated: strongly correlated axes; diagonal twin: uncorrelated
    assert cov[0, 1] > 10 and abs(torch.cov(common.load_2d('diagonal1')[0].T)[0, 1]) < 0.5


def test_gaussian_log_prob_matches_torch_distributions():
    """The one Gaussian log-density of the project, summed over the last dimension, against torch's."""
    torch.manual_seed(0)
    x, mu, logvar = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    expected = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(x).sum(-1)  # (5,)
    assert torch.allclose(vae_2d.gaussian_log_prob(x, mu, logvar), expected, atol=1e-5)


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, -1.5, 0.0])
    analytic = vae_2d.kl_standard_normal(mu, logvar)
    z = mu + (0.5 * logvar).exp() * torch.randn(400_000, 3)
    log_q = -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp())
    log_p = -0.5 * (math.log(2 * math.pi) + z ** 2)
    monte_carlo = (log_q - log_p).mean(0)
    assert torch.allclose(analytic, monte_carlo, atol=0.02), (analytic, monte_carlo)


def fixed_tiny_vae():
    torch.manual_seed(0)
    model = vae_2d.VAE2d(hidden=16)
    x = common.load_2d('gaussian1')[1][:300]
    return model, x


def test_iw_with_one_sample_is_the_elbo_in_expectation():
    model, x = fixed_tiny_vae()
    with torch.no_grad():
        iw = torch.stack([vae_2d.iw_nll(model, x, 1).mean() for _ in range(400)]).mean()
        elbo = torch.stack([vae_2d.loss_terms(model, x)['neg_elbo'] for _ in range(400)]).mean()
    assert iw == pytest.approx(float(elbo), rel=0.01)


def test_iw_with_more_samples_is_not_above_the_elbo():
    model, x = fixed_tiny_vae()
    with torch.no_grad():
        elbo = float(torch.stack([vae_2d.loss_terms(model, x)['neg_elbo'] for _ in range(100)]).mean())
        iw = [float(vae_2d.iw_nll(model, x, k).mean()) for k in (5, 50)]
    assert iw[1] <= iw[0] + 0.05 and iw[0] <= elbo + 0.05 and iw[1] < elbo


def test_chunked_iw_estimate_equals_the_unchunked_one():
    model, x = fixed_tiny_vae()
    x = x[:8]  # 8 points x 2 dims: every chunk of draws is a multiple of 16 values, for which torch's CPU
    results = []  # normal sampler gives the same numbers whether drawn at once or in pieces
    for chunk in (12, 4, 5, 1000):  # 5: the last chunk is shorter (5 + 5 + 2)
        torch.manual_seed(0)
        results.append(vae_2d.iw_nll(model, x, 12, chunk=chunk))
    assert all(torch.allclose(results[0], r, atol=1e-5) for r in results[1:])
    torch.manual_seed(0)  # the same 12 draws, weighted by hand with torch.distributions
    with torch.no_grad():
        mu, logvar = model.encode(x)
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
        z = mu + q.scale * torch.randn(12, *mu.shape)  # (12, 8, 2)
        x_mu, x_logvar = model.decode(z)
        log_w = (torch.distributions.Normal(x_mu, (0.5 * x_logvar).exp()).log_prob(x).sum(-1)
                 + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1))
        by_hand = -torch.log(log_w.exp().mean(0))  # (8,): small numbers here, no need for logsumexp
    assert torch.allclose(results[0], by_hand, atol=1e-4)


def test_evaluate_is_the_mean_of_each_term_over_the_whole_set(monkeypatch):
    """Batches of 7 over 50 points (the last one short) give the same means as one pass over all of them."""
    model, x = fixed_tiny_vae()
    monkeypatch.setattr(vae_2d, 'reparameterise', lambda mu, logvar, samples=None: mu)  # z = mu: no noise
    with torch.no_grad():
        whole = vae_2d.loss_terms(model, x[:50])
    got = vae_2d.evaluate(model, x[:50], batch_size=7)
    assert got.keys() == whole.keys() and all(got[k] == pytest.approx(float(whole[k]), rel=1e-5) for k in got)


def test_iw_moves_towards_the_true_entropy_on_2d_data(tmp_path):
    m = vae_2d.main(['--epochs', '4', '--subset', '2000', '--out', str(tmp_path), '--iw-samples', '100'])
    f = m['final_test']
    true_entropy = math.log(2 * math.pi * math.e) + math.log(5)  # 4.447 nats
    assert true_entropy - 0.1 < f['nll_iw'] < f['neg_elbo']


def test_an_ignored_latent_dimension_is_inactive():
    model, x = fixed_tiny_vae()
    with torch.no_grad():
        last = model.encoder[-1]  # rows 0..1: mu, rows 2..3: log-variance
        last.weight[0] = 0  # mu_1 no longer depends on x: the encoder ignores that dimension
        last.weight[1] *= 50  # mu_2 varies a lot over x
    kl, active = vae_2d.latent_usage(model, x)
    assert active == 1 and kl.shape == (2,)
    mu = torch.stack([torch.zeros(300), torch.randn(300)], 1)
    assert vae_image.active_units(mu) == 1


def test_latent_usage_on_posteriors_of_known_spread():
    """Active units count the dimensions whose mean varies over x by more than 0.01: here variances 0, about
    0.5 and about 4 make two. The KL per dimension is the closed form's average over x."""
    torch.manual_seed(0)
    mu = torch.randn(2000, 3) * torch.tensor([0.0, 0.7, 2.0])
    logvar = torch.randn(2000, 3) * 0.3 - 1.0
    model = types.SimpleNamespace(encode=lambda x: (mu, logvar))
    kl, active = vae_2d.latent_usage(model, torch.zeros(2000, 2))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                                 torch.distributions.Normal(0.0, 1.0)).mean(0)  # (3,)
    assert active == 2 and vae_image.active_units(mu) == 2 and torch.allclose(kl, expected, atol=1e-5)


# -------------------------------------------------------------------------------------- 2. vae_image, 3. vlae

IMAGE_PICTURES = ('samples.png', 'reconstructions.png', 'interpolations.png', 'traversals.png', 'kl_per_dim.png',
                  'curves.png')


@pytest.mark.parametrize('script', [vae_image, vlae])
def test_image_vae_end_to_end(script, image_dir, tmp_path):
    out = str(tmp_path / 'run')
    script.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '3', '--batch-size', '16',
                 '--lr', '3e-4', '--out', out, '--iw-samples', '4', '--iw-examples', '8'])
    m = read_metrics(out)
    assert sorted(m['pictures']) == sorted(IMAGE_PICTURES) and all(is_png(os.path.join(out, p)) for p in IMAGE_PICTURES)
    assert set(m['final_test']) >= {'neg_elbo', 'recon', 'kl', 'mse', 'bits_per_dim', 'sse_plus_kl', 'nll_iw',
                                    'bits_per_dim_iw', 'active_units', 'bits_per_dim_discrete',
                                    'bits_per_dim_iw_discrete', 'discrete_scale'}
    assert m['test_history']['neg_elbo'][-1] < m['test_history']['neg_elbo'][0]
    f = m['final_test']
    assert f['bits_per_dim'] == pytest.approx(vae_image.bits_per_dim(f['neg_elbo'], 3072))  # tested below
    assert 0 < f['bits_per_dim_discrete'] < 8.5 and f['bits_per_dim_iw_discrete'] > 0  # bits of 8-bit pixels
    # sse_plus_kl, the course's number: the summed squared error plus the KL; at s = 1 the reconstruction term is
    # 1/2 (D log 2 pi + SSE), so SSE = 2 recon - D log 2 pi, an identity whatever the network
    assert f['sse_plus_kl'] == pytest.approx(2 * f['recon'] - 3072 * math.log(2 * math.pi) + f['kl'], rel=1e-5)
    assert f['sse_plus_kl'] == pytest.approx(f['mse'] * 3072 + f['kl'], rel=1e-6)
    if script is vlae:  # the KL N(0, I) would charge, from the checkpoint alone, with torch.distributions
        ckpt = torch.load(os.path.join(out, 'model.pt'), weights_only=True)
        model = vae_image.VAE(3, 16, 1.0, prior=vlae.FlowPrior(16, ckpt['config']['made_hidden']))
        model.load_state_dict(ckpt['model'])
        with torch.no_grad():
            mu, logvar = model.encoder(common.load_images('cifar10', image_dir)[1])  # the 16 test images
            q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
            kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
        assert f['kl_if_standard_prior'] == pytest.approx(float(kl), rel=1e-5)


def test_reported_image_numbers_are_fp32_whatever_the_precision():
    """--precision bf16 or fp16 trains in that format; the test numbers it reports are the same as in fp32."""
    torch.manual_seed(0)
    model, x = vae_image.VAE(3, 16, 0.1), torch.rand(8, 3, 32, 32) * 2 - 1
    results = []
    for precision in ('bf16', 'fp16', 'fp32'):
        torch.manual_seed(1)  # the same posterior samples
        results.append(vae_image.evaluate(model, x, vae_image.make_parser().parse_args(
            ['--batch-size', '4', '--precision', precision])))
    assert results[0] == results[1] == results[2]


def test_image_loss_is_recon_plus_the_closed_form_kl_per_image():
    """neg_elbo = recon + KL, each summed over an image's dimensions and averaged over the batch; the standard
    normal prior's log-density and samples are torch's N(0, I)."""
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    model = types.SimpleNamespace(encoder=lambda x: (mu, logvar), decoder_std=1.0,
                                  decoder=lambda z: torch.zeros(len(z), 1, 2, 2))  # recon independent of z
    terms = vae_image.loss_terms(model, torch.ones(5, 1, 2, 2))
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)  # (5,)
    recon = -torch.distributions.Normal(0.0, 1.0).log_prob(torch.ones(4)).sum()  # the same for every image
    assert float(terms['kl']) == pytest.approx(float(kl.mean()), rel=1e-5)
    assert float(terms['recon']) == pytest.approx(float(recon), rel=1e-5) and float(terms['mse']) == 1.0
    assert float(terms['neg_elbo']) == pytest.approx(float(recon + kl.mean()), rel=1e-5)
    prior, z = vae_image.StandardNormal(3), torch.randn(4, 3)
    assert prior.sample(6, 'cpu').shape == (6, 3)
    assert torch.allclose(prior.log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1))


def test_final_metrics_use_the_scripts_own_loss():
    """vlae.py passes its loss to final_metrics: the test numbers must be computed with it, not the VAE's."""
    torch.manual_seed(0)
    model, x = vae_image.VAE(3, 4, 1.0), torch.rand(6, 3, 32, 32) * 2 - 1
    args = vae_image.make_parser().parse_args(['--iw-samples', '2', '--iw-examples', '4'])
    fixed = {'neg_elbo': 7.0, 'recon': 5.0, 'kl': 2.0, 'mse': 0.25}
    final = vae_image.final_metrics(model, x, x, args, lambda m, b: {k: torch.tensor(v) for k, v in fixed.items()})
    assert {k: final[k] for k in fixed} == fixed and final['neg_elbo_iw_subset'] == 7.0


def test_final_metrics_on_a_model_whose_answers_are_known():
    """A stand-in whose decoder ignores z and whose posterior means are +-3 in two of four dimensions: two
    active units; the discrete ELBO (K = 1) is -log P(x | x_hat) plus the KL, |mu|^2 / 2 = 9 nats, over D ln 2
    (its sampling noise, mu . eps, is 1e-4 bits over 400 images; K = 2 would be 8e-4 bits lower); the
    K-sample bound lies between the ELBO and the exact -log P(x | x_hat), which needs no z here."""
    torch.manual_seed(0)
    x = ((torch.rand(400, 3, 32, 32) * 255).round() / 127.5 - 1)  # on the 256 levels
    x_hat = torch.rand(1, 3, 32, 32) * 1.6 - 0.8

    def encoder(b):  # (B, C, H, W) -> mu, logvar (B, 4): mu_1 = mu_2 = +-3 by the sign of a pixel
        mu = torch.zeros(len(b), 4)
        mu[:, :2] = 3.0 * torch.sign(b[:, :1, 0, 0])
        return mu, torch.zeros_like(mu)
    model = types.SimpleNamespace(encoder=encoder, decoder=lambda z: x_hat.expand(len(z), -1, -1, -1),
                                  decoder_std=1.0, prior=vae_image.StandardNormal(4), eval=lambda: None)
    args = vae_image.make_parser().parse_args(['--iw-samples', '3', '--iw-examples', '100'])
    final = vae_image.final_metrics(model, x[:50], x, args)  # the scale fitted on 50: it only needs to be fixed
    exact = -vae_image.discrete_log_prob(x, x_hat.expand(400, -1, -1, -1), final['discrete_scale'])  # (400,)
    bits = 1 / (3072 * math.log(2))
    assert final['active_units'] == 2
    assert final['bits_per_dim_discrete'] == pytest.approx(float(exact.mean() + 9) * bits, abs=3e-4)
    assert float(exact[:100].mean()) * bits - 3e-4 < final['bits_per_dim_iw_discrete'] < \
        float(exact[:100].mean() + 9) * bits - 3e-4


def test_image_evaluate_is_the_mean_over_the_whole_set(monkeypatch):
    """Batches of 3 over 8 images (the last one short) give the same means as one pass over all of them."""
    torch.manual_seed(0)
    model, x = vae_image.VAE(3, 4, 1.0).eval(), torch.rand(8, 3, 32, 32) * 2 - 1
    monkeypatch.setattr(vae_image, 'reparameterise', lambda mu, logvar, samples=None: mu)  # z = mu: no noise
    with torch.no_grad():
        whole = vae_image.with_course_metrics({k: float(v) for k, v in vae_image.loss_terms(model, x).items()}, 3072)
    got = vae_image.evaluate(model, x, vae_image.make_parser().parse_args(['--batch-size', '3']))
    assert got.keys() == whole.keys() and all(got[k] == pytest.approx(whole[k], rel=1e-5) for k in got)


def test_image_vae_on_one_channel_mnist(image_dir, tmp_path):
    vae_image.main(['--dataset', 'mnist', '--data-dir', image_dir, '--epochs', '1', '--batch-size', '32',
                    '--out', str(tmp_path), '--iw-samples', '2', '--iw-examples', '4'])
    assert read_metrics(str(tmp_path))['final_test']['mse'] > 0


def test_reconstruction_matches_torch_distributions():
    """-log p(x|z) of the image VAE is -log N(x; decoder(z), s^2 I), summed over pixels, at any s."""
    torch.manual_seed(0)
    x, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 16)
    for s in (1.0, 0.3):
        model = vae_image.VAE(3, 16, decoder_std=s)
        recon, mse = vae_image.reconstruction(model, x, z)
        with torch.no_grad():
            mean = model.decoder(z)
        expected = -torch.distributions.Normal(mean, s).log_prob(x).flatten(1).sum(1)  # (4,)
        assert torch.allclose(recon, expected, rtol=1e-5)
        assert torch.allclose(mse, ((x - mean) ** 2).flatten(1).mean(1))


def test_bits_per_dim_is_the_density_on_the_0_255_scale():
    """Computed independently: the same Gaussian written on 0-255 pixels, N(127.5 (x + 1); 127.5 (m + 1),
    (127.5 s)^2), in bits, per dimension. And a uniform density on [-1, 1] is log2(255) bits on 0-255."""
    torch.manual_seed(0)
    x, m, s = torch.rand(6, 3, 32, 32) * 2 - 1, torch.rand(6, 3, 32, 32) * 2 - 1, 0.2
    nats = -torch.distributions.Normal(m, s).log_prob(x).flatten(1).sum(1)  # on [-1, 1] pixels: (6,)
    on_255 = -torch.distributions.Normal(127.5 * (m + 1), 127.5 * s).log_prob(127.5 * (x + 1))
    expected = on_255.flatten(1).sum(1) / 3072 / math.log(2)  # (6,)
    assert torch.allclose(vae_image.bits_per_dim(nats, 3072), expected, rtol=1e-5)
    assert vae_image.bits_per_dim(3072 * math.log(2), 3072) == pytest.approx(math.log2(255))


# ------------------------------------------------------------------------- the discrete likelihood (issue 22)

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 values of an 8-bit pixel on [-1, 1]


@pytest.mark.parametrize('mean, scale', [(0.3, 0.05), (-0.99, 0.002), (1.5, 0.3), (0.0, 1e-3), (0.9, 3.0)])
def test_discrete_likelihood_is_the_gaussian_mass_of_each_level(mean, scale):
    """Against torch.distributions: the CDF difference over the level's bin, the end bins taking the tails;
    and the 256 masses sum to one."""
    log_p = vae_image.discrete_log_prob(LEVELS[:, None], torch.full((256, 1), mean, dtype=torch.float64), scale)  # (256,)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), scale)
    upper = torch.where(LEVELS == 1, 1.0, normal.cdf(LEVELS + 1 / 255))
    lower = torch.where(LEVELS == -1, 0.0, normal.cdf(LEVELS - 1 / 255))
    assert torch.allclose(log_p.double().exp(), upper - lower, rtol=1e-5, atol=1e-9)  # float32 log-probs
    assert float(log_p.double().exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_discrete_likelihood_sums_to_one_over_every_two_pixel_image():
    images = torch.cartesian_prod(LEVELS, LEVELS)  # all 65,536 images of two 8-bit pixels
    log_p = vae_image.discrete_log_prob(images, torch.tensor([[0.2, -0.7]]).expand(len(images), 2), 0.1)
    assert float(log_p.double().exp().sum()) == pytest.approx(1.0, abs=2e-6)
    far = vae_image.discrete_log_prob(torch.tensor([[1.0]]), torch.tensor([[-1.0]]), 0.01)  # 200 std away:
    assert torch.isfinite(far).all() and far < -19_000  # finite, in the tail, where a plain CDF difference is 0


def test_the_fitted_discrete_scale_is_the_likeliest():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (200, 48)).double() / 127.5 - 1
    x_hat = x + 0.05 * torch.randn_like(x)  # reconstructions off by noise of std 0.05
    scale = vae_image.fit_discrete_scale(x, x_hat)
    nll = lambda s: float(-vae_image.discrete_log_prob(x, x_hat, s).mean())
    assert scale == pytest.approx(0.05, rel=0.1) and nll(scale) <= min(nll(scale * 1.1), nll(scale / 1.1))


class LinearGaussian:
    """x = w z + s * noise with z ~ N(0, 1), x in R^4 shaped as a 1x2x2 image, and an encoder that returns
    the exact posterior. Then every importance weight p(x|z) p(z) / q(z|x) equals p(x): the IWAE estimate
    is exact for any K, and -log p(x) is known in closed form, x ~ N(0, s^2 I + w w^T)."""
    def __init__(self, w, s):
        self.w, self.decoder_std, self.prior = w, s, vae_image.StandardNormal(1)

    def encoder(self, x):
        precision = 1 + self.w @ self.w / self.decoder_std ** 2
        mu = (x.flatten(1) @ self.w / self.decoder_std ** 2 / precision)[:, None]  # (B, 4) -> (B, 1)
        return mu, torch.full_like(mu, -math.log(precision))

    def decoder(self, z):
        return (z * self.w).view(-1, 1, 2, 2)  # (B, 1) -> (B, 4) -> (B, 1, 2, 2)

    def neg_log_px(self, x):
        cov = self.decoder_std ** 2 * torch.eye(4) + torch.outer(self.w, self.w)
        return -torch.distributions.MultivariateNormal(torch.zeros(4), cov).log_prob(x.flatten(1))


def test_image_iw_nll_is_exact_with_the_true_posterior():
    """The estimate vlae.py and vae_image.py report: without its - log K or its log q(z|x) term, or with
    a wrong prior or decoder density, it would miss the closed form."""
    torch.manual_seed(0)
    model = LinearGaussian(torch.tensor([1.5, -0.5, 0.8, 2.0]), s=0.7)
    x = model.decoder(torch.randn(10, 1)) + 0.7 * torch.randn(10, 1, 2, 2)
    for k in (1, 7):
        assert torch.allclose(vae_image.iw_nll(model, x, k), model.neg_log_px(x), atol=1e-4)


class ShiftedPrior:
    """p(z) = N(m, 1): a prior other than N(0, I), so an estimator that assumed N(0, I) would be caught."""
    def __init__(self, m):
        self.m = m

    def log_prob(self, z):
        return torch.distributions.Normal(self.m, 1.0).log_prob(z).sum(-1)


def test_image_iw_nll_tightens_towards_the_exact_value_with_a_wrong_posterior():
    """q(z|x) twice as wide as the posterior and off-centre, prior N(0.8, 1): now the weights differ, K = 1 is
    the ELBO, and the estimate falls towards the closed form as K grows, never below it (in expectation). An
    estimator that averaged log-weights, or used N(0, I) for the prior, would stay at the ELBO or miss."""
    torch.manual_seed(0)
    w, s, m = torch.tensor([1.5, -0.5, 0.8, 2.0]), 0.7, 0.8
    model = LinearGaussian(w, s)
    model.prior = ShiftedPrior(m)
    exact_posterior = model.encoder
    model.encoder = lambda x: (exact_posterior(x)[0] + 0.3, exact_posterior(x)[1] + math.log(4.0))
    x = model.decoder(m + torch.randn(10, 1)) + s * torch.randn(10, 1, 2, 2)
    cov = s ** 2 * torch.eye(4) + torch.outer(w, w)
    exact = -torch.distributions.MultivariateNormal(w * m, cov).log_prob(x.flatten(1)).mean()
    elbo = torch.stack([vae_image.iw_nll(model, x, 1).mean() for _ in range(2000)]).mean()
    k10 = torch.stack([vae_image.iw_nll(model, x, 10).mean() for _ in range(200)]).mean()
    k2000 = vae_image.iw_nll(model, x, 2000).mean()
    assert elbo > k10 + 0.1 > exact + 0.1 and k2000 == pytest.approx(float(exact), abs=0.02), (elbo, k10, k2000, exact)


def test_vlae_kl_is_log_q_minus_log_p_at_the_posterior_sample():
    """With the flow at its start (the identity: p(z) = N(0, I)) the one-sample KL must average to the closed
    form; the prior evaluated anywhere but at the sample z would not."""
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.3, -1.5, 0.0]])
    model = types.SimpleNamespace(  # a fixed posterior, a decoder that ignores z, and the flow at its start:
        encoder=lambda x: (mu.expand(len(x), -1), logvar.expand(len(x), -1)), decoder_std=1.0,
        decoder=lambda z: torch.zeros(len(z), 1, 2, 2), prior=vlae.FlowPrior(3, hidden=8))  # zero last layer
    with torch.no_grad():
        terms = vlae.loss_terms(model, torch.zeros(200_000, 1, 2, 2))
    assert float(terms['kl']) == pytest.approx(float(vae_2d.kl_standard_normal(mu, logvar).sum()), abs=0.01)
    assert float(terms['neg_elbo']) == pytest.approx(float(terms['recon'] + terms['kl']), rel=1e-6)
    with torch.no_grad():  # per dimension too, by Monte Carlo: (B, D), each the closed form here
        per_dim = vlae.kl_per_dim(model, torch.zeros(2, 1, 2, 2), samples=100_000)
    assert per_dim.shape == (2, 3) and torch.allclose(per_dim, vae_2d.kl_standard_normal(mu, logvar), atol=0.02)


def test_masked_linear_is_a_linear_layer_with_masked_weights():
    torch.manual_seed(0)
    mask = torch.rand(4, 3) > 0.5
    layer = vlae.MaskedLinear(3, 4, mask)
    x = torch.randn(5, 3)
    assert torch.allclose(layer(x), x @ (layer.weight * mask).T + layer.bias)


def test_made_hidden_degrees_cycle_so_every_unit_is_used():
    """A hidden unit's degree is how many inputs it may see: degrees cycle through 1..D-1 (counts differ by at
    most one), and every hidden unit has an input and feeds some output, so no unit is dead by its mask."""
    for d in (2, 3, 6):
        masks = [m.mask for m in vlae.MADE(d, hidden=14).net if isinstance(m, vlae.MaskedLinear)]  # 3 masks
        degree = masks[0].sum(1).long()  # (hidden,): inputs 1..degree
        counts = torch.bincount(degree, minlength=d)[1:]  # how many units of each degree 1..D-1
        assert degree.min() == 1 and degree.max() == max(d - 1, 1) and counts.max() - counts.min() <= 1
        assert (masks[1].sum(1) > 0).all() and (masks[2].sum(0) > 0).all()


def test_made_log_sigma_bound_is_b_tanh_of_the_free_value():
    torch.manual_seed(0)
    free = vlae.MADE(4, hidden=16)
    torch.nn.init.normal_(free.net[-1].weight, std=10.0)  # large log-sigmas, so that the bound matters
    bounded = vlae.MADE(4, hidden=16, log_sigma_bound=2.0)
    bounded.load_state_dict(free.state_dict())
    z = torch.randn(100, 4)
    (mu_free, ls_free), (mu, ls) = free(z), bounded(z)
    assert ls_free.abs().max() > 3 and ls.abs().max() < 2  # the bound was needed, and held
    assert torch.equal(mu, mu_free) and torch.allclose(ls, 2.0 * torch.tanh(ls_free / 2.0), atol=1e-6)


def random_flow(d=6):
    torch.manual_seed(0)
    prior = vlae.FlowPrior(d, hidden=32)
    torch.nn.init.normal_(prior.made.net[-1].weight, std=0.3)  # the real init is the identity: perturb it
    torch.nn.init.normal_(prior.made.net[-1].bias, std=0.3)
    return prior


def test_made_jacobian_is_lower_triangular_with_log_sigma_diagonal():
    prior = random_flow()
    z = torch.randn(6)
    jac = torch.autograd.functional.jacobian(lambda v: prior(v[None])[0][0], z)  # d eps_i / d z_j: (6, 6)
    assert torch.count_nonzero(jac.triu(1)) == 0  # eps_i never depends on z_j, j >= i, except z_i itself
    assert torch.count_nonzero(jac.tril(-1)) == 15  # and depends on every earlier one: no allowed link dropped
    log_sigma = prior(z[None])[1][0]
    assert torch.allclose(torch.logdet(jac), log_sigma.sum(), atol=1e-5)
    assert torch.allclose(jac.diagonal(), log_sigma.exp(), atol=1e-6)


def test_flow_inverse_round_trips():
    prior = random_flow()
    eps = torch.randn(50, 6)
    z = prior.sample(50, 'cpu', eps=eps)
    assert torch.allclose(prior(z)[0], eps, atol=1e-5)


def test_flow_log_prob_is_a_density():
    """The flow's density integrates to about one: a check on the log-determinant's sign, in 2D."""
    prior = random_flow(d=2)
    g = torch.linspace(-8, 8, 401)
    z = torch.cartesian_prod(g, g)  # (401*401, 2) grid
    with torch.no_grad():
        mass = prior.log_prob(z).exp().sum() * (g[1] - g[0]) ** 2
    assert mass == pytest.approx(1.0, abs=0.02)


# --------------------------------------------------------------------------------------------------- 4. vqvae

def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=20, code_dim=8)
    torch.nn.init.normal_(model.codebook.weight)
    z_e = torch.randn(2, 8, 3, 3)
    codes = model.nearest_code(z_e)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                dists = [float(((z_e[b, :, i, j] - e) ** 2).sum()) for e in model.codebook.weight.detach()]
                assert codes[b, i, j] == int(np.argmin(dists))
    assert torch.equal(model.lookup(codes)[0, :, 1, 2], model.codebook.weight[codes[0, 1, 2]])


def test_nearest_code_under_amp_is_the_fp32_nearest():
    """Under --amp the encoder's outputs are bfloat16; the distances must still be fp32, or near-ties flip."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=128, code_dim=256)
    torch.nn.init.normal_(model.codebook.weight)
    z_e = torch.randn(4, 256, 8, 8).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        codes = model.nearest_code(z_e)
    brute = torch.cdist(vqvae.flatten_grid(z_e).double(), model.codebook.weight.double()).argmin(1)
    assert torch.equal(codes.flatten(), brute)


def test_usage_stats_on_known_counts():
    stats = vqvae.usage_stats(torch.tensor([6, 2, 0, 0]))  # p = (3/4, 1/4, 0, 0)
    assert stats['codes_used'] == 2 and vqvae.usage_stats(torch.tensor([6, 1, 0, 1]))['codes_used'] == 3
    assert stats['perplexity'] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert vqvae.usage_stats(torch.tensor([5, 5, 5, 5]))['perplexity'] == pytest.approx(4.0)  # even use: K


def test_evaluate_counts_every_test_output_in_eval_mode():
    """Usage over the whole set, batch by batch, with batch norm's running statistics: each image's codes are
    those it gets alone, whatever batch it was in (train mode would make them depend on the batch)."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=16, code_dim=16)
    model.train()(torch.rand(8, 3, 32, 32) * 2 - 1)  # running statistics away from their start
    x = torch.rand(12, 3, 32, 32) * 2 - 1
    args = vqvae.parse_args(['--batch-size', '5', '--num-codes', '16', '--code-dim', '16'])
    model.train()
    final, counts, seen = vqvae.evaluate(model, x, args)
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1])[3].flatten() for i in range(12)])  # model is in eval mode now
        decoded = model(x)[0]
        recon = torch.stack([((model(x[i:i + 1])[0] - x[i:i + 1]) ** 2).mean() for i in range(12)]).mean()
    assert seen['outside_range'] == float((decoded.abs() > 1).float().mean()) == 0  # tanh: inside by construction
    assert torch.equal(counts, torch.bincount(alone, minlength=16)) and counts.sum() == 12 * 64
    assert final['codes_used'] == int((counts > 0).sum()) and final['recon_mse'] == pytest.approx(float(recon))
    # `loss` is what each mode minimises: without the codebook term under ema, eq. 3 whole under loss
    assert final['loss'] == pytest.approx(final['recon_mse'] + args.beta * final['commitment'], rel=1e-5)
    args.codebook = 'loss'
    final = vqvae.evaluate(model, x, args)[0]
    assert final['loss'] == pytest.approx(final['eq3_loss'], rel=1e-6)
    assert final['eq3_loss'] == pytest.approx(final['recon_mse'] + final['codebook'] + args.beta * final['commitment'],
                                              rel=1e-5)


def test_cifar10_recipe_rebuilds_the_pickle_from_jpegs(tmp_path, monkeypatch):
    """The data recipe on JPEGs made here: three classes whose images are flat colours, so each decoded image tells
    its class and file; the order is classes by name, files by name, then RandomState(0).permutation."""
    from PIL import Image
    colours = {'cat': (200, 30, 30), 'airplane': (30, 200, 30), 'bird': (30, 30, 200)}  # not in sorted order
    for split, count in (('train', 4), ('test', 3)):
        for name, colour in colours.items():
            os.makedirs(tmp_path / 'jpg' / split / name)
            for i in range(count):  # brightness tells the file: 0000.jpg darkest
                image = np.full((32, 32, 3), np.array(colour) * (1 - 0.2 * i), dtype=np.uint8)
                Image.fromarray(image).save(tmp_path / 'jpg' / split / name / f'{i:04d}.jpg', quality=75)
    (tmp_path / 'jpg' / 'train' / 'cat' / 'notes.txt').write_text('not an image')
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'benchmarks'))
    import cifar10_pkl
    cifar10_pkl.main([str(tmp_path / 'jpg'), str(tmp_path / 'data'), '--train', '10', '--test', '9'])
    with open(tmp_path / 'data' / 'cifar10.pkl', 'rb') as f:
        data = pickle.load(f)
    for split, count, n in (('train', 4, 10), ('test', 3, 9)):
        labels = np.repeat(np.arange(3), count)  # airplane 0, bird 1, cat 2
        files = np.tile(np.arange(count), 3)
        order = np.random.RandomState(0).permutation(3 * count)[:n]
        assert data[split].shape == (n, 32, 32, 3) and data[split].dtype == np.uint8
        assert np.array_equal(data[f'{split}_labels'], labels[order])
        want = np.array([colours[sorted(colours)[c]] for c in labels[order]]) * (1 - 0.2 * files[order])[:, None]
        assert np.abs(data[split].mean((1, 2)) - want).max() < 4  # JPEG's rounding of a flat colour
    train, test = common.load_images('cifar10', str(tmp_path / 'data'))  # the scripts read what it wrote
    assert train.shape == (10, 3, 32, 32) and test.shape == (9, 3, 32, 32)


def test_speckle_measures_a_known_colour_speckle():
    """Bright pixels of known channel spread, reconstructed with twice that spread: bright_speckle 2. Dark pixels with
    any error do not count; decoded values above 1 count as outside the pixel range, whatever their pixel."""
    x = torch.tensor([-0.9, -0.5, 0.8])[None, :, None, None].repeat(2, 1, 4, 4)  # saturated blue, not bright ...
    x[:, :, :2] = torch.tensor([0.8, 0.9, 1.0])[:, None, None]  # ... but the top half: bright, channel spread std 0.0816
    x_hat = x.clone()
    x_hat[:, :, :2] = torch.tensor([0.7, 0.9, 1.1])[:, None, None]  # twice as spread: one value in three above 1
    x_hat[:, :, 2:] = torch.tensor([-1.5, 0.5, -0.5])[:, None, None]  # dark, wildly coloured, one value below -1
    sums = vqvae.speckle(x[:1], x_hat[:1])
    sums = {k: v + vqvae.speckle(x[1:], x_hat[1:])[k] for k, v in sums.items()}  # summed over two batches
    got = vqvae.finish_speckle(sums)
    assert got['bright_speckle'] == pytest.approx(2.0, rel=1e-5)
    assert got['outside_range'] == pytest.approx((2 * 8 * 1 + 2 * 8 * 1) / (2 * 3 * 16))
    assert math.isnan(vqvae.finish_speckle(vqvae.speckle(x[:, :1], x_hat[:, :1]))['bright_speckle'])  # grey: none


def test_tanh_output_keeps_decoded_values_in_range_and_linear_does_not():
    torch.manual_seed(0)
    for output, inside in (('tanh', True), ('linear', False)):
        model = vqvae.VQVAE(3, num_codes=8, code_dim=8, output=output)
        with torch.no_grad():
            model.decoder[-2].bias.fill_(3.0)  # the last convolution pushed far out of range
            x_hat = model(torch.rand(2, 3, 32, 32) * 2 - 1)[0]
        assert bool((x_hat.abs() <= 1).all()) == inside


def test_codebook_initialisation_range():
    w = vqvae.VQVAE(3, num_codes=128, code_dim=256).codebook.weight
    assert w.abs().max() <= 1 / 128 and w.abs().max() > 0.9 / 128 and w.std() > 0.5 / 128 / math.sqrt(3)


def test_gradients_flow_where_the_loss_says():
    """Straight-through: the reconstruction reaches the encoder; codebook and commitment terms each reach
    only their own side."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=16, code_dim=16)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    terms = vqvae.loss_terms(model, x, beta=0.25)

    def grads(term):
        model.zero_grad()
        terms[term].backward(retain_graph=True)
        enc = sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None)
        book = model.codebook.weight.grad
        return enc, 0.0 if book is None else float(book.abs().sum())

    enc, book = grads('recon_mse')
    assert enc > 0 and book == 0  # through z_e + sg[z_q - z_e], not through the codebook
    enc, book = grads('codebook')
    assert enc == 0 and book > 0
    enc, book = grads('commitment')
    assert enc > 0 and book == 0


def test_the_decoder_is_fed_the_quantised_vectors():
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=16, code_dim=16)
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    _, z_e, z_q, _ = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.allclose(seen[0], z_q, atol=1e-6) and not torch.allclose(seen[0], z_e, atol=1e-2)  # z_q, not z_e


def test_vq_loss_is_eq3_whole_unless_told_otherwise():
    torch.manual_seed(0)
    with torch.no_grad():
        terms = vqvae.loss_terms(vqvae.VQVAE(3, num_codes=16, code_dim=8), torch.rand(2, 3, 32, 32) * 2 - 1, 0.25)
    assert float(terms['loss']) == float(terms['eq3_loss']) == pytest.approx(
        float(terms['recon_mse'] + terms['codebook'] + 0.25 * terms['commitment']), rel=1e-6)


@pytest.mark.parametrize('codebook_loss', [True, False])
def test_beta_multiplies_the_commitment_term_and_nothing_else(codebook_loss):
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=16, code_dim=16)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    a = vqvae.loss_terms(model, x, 0.2, codebook_loss)
    b = vqvae.loss_terms(model, x, 0.7, codebook_loss)
    for key in ('recon_mse', 'codebook', 'commitment'):
        assert torch.equal(a[key], b[key])
    assert torch.allclose(b['loss'] - a['loss'], 0.5 * a['commitment'])
    codebook = a['codebook'] if codebook_loss else 0  # with an EMA codebook the term is reported, not trained
    assert torch.allclose(a['loss'], a['recon_mse'] + codebook + 0.2 * a['commitment'])
    # eq. 3 whole, in both modes: the number set beside the course's test loss
    assert torch.allclose(a['eq3_loss'], a['recon_mse'] + a['codebook'] + 0.2 * a['commitment'])
    # codebook and commitment are equal in value, so only gradients tell which one beta multiplies: the codes'
    # gradient from the loss is beta-free, the encoder's output gets beta times the commitment's
    for terms, beta in ((a, 0.2), (b, 0.7)):
        z_e = terms['z_e']
        g_out, = torch.autograd.grad(terms['loss'], z_e, retain_graph=True)
        g_commit, = torch.autograd.grad(terms['commitment'], z_e, retain_graph=True)
        g_recon, = torch.autograd.grad(terms['recon_mse'], z_e, retain_graph=True)
        assert torch.allclose(g_out, g_recon + beta * g_commit, atol=1e-7)
        if codebook_loss:
            w = model.codebook.weight
            g_w, = torch.autograd.grad(terms['loss'], w, retain_graph=True)
            assert torch.allclose(g_w, torch.autograd.grad(terms['codebook'], w, retain_graph=True)[0])


def test_ema_codebook_is_a_running_average():
    """Three codes in 2D, three steps of assignments: the update against the same averages by hand."""
    model = vqvae.VQVAE(1, num_codes=3, code_dim=2)
    start = model.codebook.weight.detach().clone()
    g, eps = 0.9, 1e-5
    count, total = torch.ones(3), start.clone()  # by hand: N_i and m_i, starting as in the model
    torch.manual_seed(0)
    for _ in range(3):
        z = torch.randn(5, 2)  # five encoder outputs...
        codes = torch.tensor([0, 0, 2, 0, 2])  # ...assigned by hand; code 1 gets nothing
        vqvae.ema_update(model, z.T.reshape(1, 2, 5, 1), codes.view(1, 5, 1), g, move_codes=True)
        for i in range(3):
            mine = [z[j] for j in range(5) if codes[j] == i]
            count[i] = g * count[i] + (1 - g) * len(mine)
            total[i] = g * total[i] + (1 - g) * (sum(mine) if mine else torch.zeros(2))
    smoothed = (count + eps) / (count.sum() + 3 * eps) * count.sum()
    assert torch.allclose(model.ema_count, count) and torch.allclose(model.codebook.weight, total / smoothed[:, None])
    assert torch.allclose(model.codebook.weight[1], start[1], atol=1e-4)  # unused: m_1, N_1 decay together


def test_a_restart_moves_dead_codes_apart_and_resets_their_adam_moments():
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=16, code_dim=8)
    optimizer = torch.optim.Adam([model.codebook.weight], lr=1e-3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = vqvae.loss_terms(model, x, 0.25)
    z_e = terms['z_e']
    terms['codebook'].backward()
    optimizer.step()  # Adam now holds moments for every row
    z_e = torch.zeros_like(z_e.detach())  # the worst case: every encoder output is the same vector
    model.ema_count[:10] = 0.1  # codes 0..9 unused
    before = model.codebook.weight.detach().clone()
    sq_live = optimizer.state[model.codebook.weight]['exp_avg_sq'][10:].mean(0)
    assert vqvae.restart_dead_codes(model, z_e, optimizer, threshold=1.0) == 10
    w = model.codebook.weight
    assert torch.cdist(w, w).add(torch.eye(16)).min() > 0  # no two codes equal
    assert torch.equal(w[10:], before[10:]) and not torch.equal(w[:10], before[:10])
    state = optimizer.state[w]
    assert (state['exp_avg'][:10] == 0).all() and torch.allclose(state['exp_avg_sq'][:10], sq_live.expand(10, -1))
    assert (model.ema_count >= 1.0).all()  # the restarted codes have time to be chosen


def test_kmeans_pp_draws_in_proportion_to_the_squared_distance(monkeypatch):
    """Points 0, 1, 3 and 3.1 along a line that starts at (5, 5), the first seed forced to the first point: the
    second is drawn with probability D^2 / sum D^2 = (0, 1, 9, 9.61) / 19.61, the third from the distances to
    the nearer seed, and the fourth is the one left (every chosen point's distance drops to 0)."""
    flat = 5 + torch.tensor([0.0, 1.0, 3.0, 3.1])[:, None] * torch.ones(1, 2) / math.sqrt(2)  # 4 points in 2D
    model = vqvae.VQVAE(1, num_codes=4, code_dim=2)
    vqvae.set_use(model, 8.0)  # as main does before seeding: each code's sum m_i must follow, e_i = m_i / N_i
    monkeypatch.setattr(torch, 'randint', lambda *a, **k: torch.tensor(0))
    picks = []
    for seed in range(3000):
        torch.manual_seed(seed)
        vqvae.kmeans_pp_init(model, flat.T.reshape(1, 2, 4, 1))
        picks.append([int(torch.cdist(model.codebook.weight[i:i + 1], flat).argmin()) for i in range(4)])
        assert sorted(picks[-1]) == [0, 1, 2, 3]
    assert torch.allclose(model.ema_sum, model.codebook.weight * model.ema_count[:, None])  # e_i = m_i / N_i
    second = np.bincount([p[1] for p in picks], minlength=4) / 3000
    assert second[0] == 0 and second[1] == pytest.approx(1 / 19.61, abs=0.015)
    assert second[3] == pytest.approx(9.61 / 19.61, abs=0.03)
    # after 0 and 3: the third is 1 (D^2 = 1) or 3.1 (D^2 = 0.01): 1 with probability 1 / 1.01
    third = [p[2] for p in picks if p[1] == 2]
    assert np.mean([t == 1 for t in third]) > 0.97


def test_no_restart_in_the_first_steps_and_a_dead_code_restarts_after_69():
    """Every code starts with the use a restarted code gets, 2 x threshold: on well-spread outputs none
    counts as dead in the first steps (a start at 1 would restart them all after one step), and a code
    nothing chooses is restarted when 8 x 0.99^t falls below 4, at step 69."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(1, num_codes=16, code_dim=8)
    optimizer = torch.optim.Adam([model.codebook.weight])
    vqvae.set_use(model, vqvae.fresh_use(4.0))
    vqvae.kmeans_pp_init(model, torch.randn(64, 8, 8, 1))
    for step in range(10):
        z_e = torch.randn(64, 8, 8, 1)  # 512 outputs a step, 32 a code on average
        vqvae.ema_update(model, z_e, model.nearest_code(z_e), 0.99, move_codes=True)
        assert vqvae.restart_dead_codes(model, z_e, optimizer, 4.0) == 0, f'step {step + 1}'
    vqvae.set_use(model, vqvae.fresh_use(4.0))
    z_e = torch.randn(1, 8, 4, 1)
    for step in range(1, 80):
        vqvae.ema_update(model, z_e, torch.ones(1, 4, 1, dtype=torch.long), 0.99, move_codes=False)  # code 1 only
        if vqvae.restart_dead_codes(model, z_e, optimizer, 4.0):
            break
    assert step == 69 and vqvae.fresh_use(0.0) == 1.0  # with restarts off: as if chosen once


def test_set_use_keeps_each_code_the_mean_of_its_sum():
    torch.manual_seed(0)
    model = vqvae.VQVAE(1, num_codes=6, code_dim=4)
    vqvae.set_use(model, 8.0)
    assert torch.equal(model.ema_count, torch.full((6,), 8.0))
    assert torch.allclose(model.ema_sum, 8.0 * model.codebook.weight)  # e_i = m_i / N_i: the codes unchanged


def test_restarts_land_on_distinct_outputs_with_noise_at_their_scale():
    """Each dead code moves to an encoder output of its own (without replacement when there are enough, here
    exactly as many), plus noise of 1% of the outputs' spread, at any scale; its use and sum restart together
    (e = m / N). With no live code left, Adam's second moment restarts at 0. A single dead code restarts too."""
    torch.manual_seed(0)
    for scale in (50.0, 0.1):
        model = vqvae.VQVAE(1, num_codes=12, code_dim=16)
        optimizer = torch.optim.Adam([model.codebook.weight])
        model.codebook.weight.pow(2).sum().backward()
        optimizer.step()  # Adam holds moments for every code
        outputs = torch.randn(12, 16) * scale
        z_e = outputs.T.reshape(1, 16, 12, 1)  # (N, D) -> (1, D, N, 1): flatten_grid gives the rows back
        model.ema_count.fill_(0.5)  # all 12 codes dead
        assert vqvae.restart_dead_codes(model, z_e, optimizer, threshold=4.0) == 12
        w = model.codebook.weight.detach()
        dist = torch.cdist(w, outputs)  # (codes, outputs)
        assert sorted(dist.argmin(1).tolist()) == list(range(12))  # each output taken once
        noise = dist.min(1).values / (0.01 * outputs.std(correction=0) * 4)  # |noise| / (1% spread x sqrt(D))
        assert 0.5 < float(noise.mean()) < 1.5
        assert torch.allclose(model.ema_sum, w * 8.0) and (model.ema_count == 8.0).all()
        assert (optimizer.state[model.codebook.weight]['exp_avg_sq'] == 0).all()
    model.ema_count.fill_(10.0)
    model.ema_count[3] = 0.5
    assert vqvae.restart_dead_codes(model, z_e, optimizer, threshold=4.0) == 1 and model.ema_count[3] == 8.0


def test_a_restart_needs_no_more_outputs_than_dead_codes(image_dir, tmp_path):
    """A batch with fewer outputs than dead codes: outputs are drawn again, with noise keeping codes apart."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(1, num_codes=16, code_dim=8)
    z_e = torch.randn(1, 8, 2, 2)  # 4 outputs, 16 dead codes
    model.ema_count.zero_()
    assert vqvae.restart_dead_codes(model, z_e, torch.optim.Adam([model.codebook.weight]), 4.0) == 16
    w = model.codebook.weight
    assert torch.cdist(w, w).add(torch.eye(16)).min() > 0  # no two codes equal
    assert torch.cdist(w, vqvae.flatten_grid(z_e)).min(1).values.max() < 0.2  # each next to an output
    m = vqvae.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--batch-size', '1', '--subset', '10',
                    '--epochs', '1', '--num-codes', '8', '--code-dim', '16', '--out', str(tmp_path / 'b1')])
    assert m['epochs_trained'] == 1


def test_train_epoch_takes_full_batches_and_no_restart_after_its_last_step(monkeypatch):
    calls = []
    real = vqvae.restart_dead_codes
    monkeypatch.setattr(vqvae, 'restart_dead_codes', lambda *a: calls.append(1) or real(*a))
    model = vqvae.VQVAE(3, num_codes=8, code_dim=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    args = vqvae.parse_args(['--batch-size', '4', '--num-codes', '8'])
    args.restart_below = 1e9  # every code dead (parse_args refuses it: every code would restart every step)
    sizes = []
    loss_fn = lambda model, batch, *a: sizes.append(len(batch)) or vqvae.loss_terms(model, batch, *a)
    logs = vqvae.train_epoch(model, optimizer, FP32, torch.rand(10, 3, 32, 32) * 2 - 1, args, (1, 1), loss_fn)
    assert sizes == [4, 4]  # full batches only: the 2 left over are skipped
    assert len(calls) == 1 and logs['restarts'].tolist() == [8, 0]  # none after the last step
    vqvae.train_epoch(model, optimizer, FP32, torch.rand(3, 3, 32, 32) * 2 - 1, args, (1, 1), loss_fn)
    assert sizes[2:] == [3]  # fewer images than a batch: one step on all of them



def test_precise_batch_norm_is_the_average_of_the_batches_statistics():
    """recompute_batchnorm: each norm's running mean and variance become the average over the batches of what
    training mode uses (checked on the first norm, which sees the first convolution); nothing else moves."""
    torch.manual_seed(0)
    model = vqvae.VQVAE(3, num_codes=8, code_dim=8)
    x = torch.rand(12, 3, 32, 32) * 2 - 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    vqvae.recompute_batchnorm(model, x, batch_size=4)
    with torch.no_grad():
        chunks = model.encoder[0](x).split(4)  # 3 batches of (4, D, 16, 16): what the first norm sees
    mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2, 3)) for c in chunks]).mean(0)  # unbiased a batch, as PyTorch keeps it
    norm = model.encoder[1]
    assert torch.allclose(norm.running_mean, mean, atol=1e-6) and torch.allclose(norm.running_var, var, rtol=1e-5)
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers: resume stays exact
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if 'running_' in k or 'num_batches' in k}  # the norms' statistics only
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not model.training and all(m.momentum == 0.1 and not m.training for m in norms)  # ready to train on


def test_precise_batch_norm_changes_the_test_numbers_not_the_training(image_dir, tmp_path):
    """--bn-images 0 (running averages) and the default train the same weights; the default's checkpoint holds
    the statistics recomputed over the training images, and its test numbers are computed with them."""
    runs = {}
    for n in ('0', '1024'):
        out = str(tmp_path / n)
        vqvae.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '2', '--batch-size', '16',
                    '--num-codes', '8', '--code-dim', '16', '--bn-images', n, '--out', out])
        runs[n] = torch.load(os.path.join(out, 'model.pt'), weights_only=True)['model'], read_metrics(out)
    (running, m_running), (precise, m_precise) = runs['0'], runs['1024']
    statistics = {k for k in running if 'running_' in k or 'num_batches' in k}
    assert all(torch.equal(running[k], precise[k]) for k in running if k not in statistics)  # the same training
    model = vqvae.VQVAE(3, 8, 16)
    model.load_state_dict(running)
    train_x, test_x = common.load_images('cifar10', image_dir)
    vqvae.recompute_batchnorm(model, train_x[:1024], 16)  # by hand, from the other run's weights
    assert all(torch.allclose(model.state_dict()[k].float(), precise[k].float()) for k in statistics)
    args = vqvae.parse_args(['--num-codes', '8', '--code-dim', '16'])
    assert m_precise['final_test']['recon_mse'] == pytest.approx(vqvae.evaluate(model, test_x, args)[0]['recon_mse'], rel=1e-5)
    assert m_precise['final_test']['recon_mse'] != pytest.approx(m_running['final_test']['recon_mse'], rel=1e-3)

# ------------------------------------------------------------------------------------------ 5. pixelcnn_prior

def input_gradients(prior, p, size=8, hidden=8):
    """|d logits at raster position p / d input| summed per input position: (size*size,)."""
    x = torch.randn(1, hidden, size, size, dtype=torch.float64, requires_grad=True)
    logits = prior.from_embedding(x)  # (1, K, H, W)
    logits[0, :, p // size, p % size].sum().backward()
    return x.grad.abs().sum(1).flatten()  # (1, E, H, W) -> (H*W,)


def test_masks_by_hand():
    """Type A sees the rows above and the centre row left of the centre; type B the centre too. The gated
    stacks: a vertical kernel of the rows above (and the centre row once the input excludes it), a
    horizontal one left of the centre (and the centre after the first layer)."""
    rows = {'A': [[1] * 5, [1] * 5, [1, 1, 0, 0, 0], [0] * 5, [0] * 5]}
    rows['B'] = rows['A'][:2] + [[1, 1, 1, 0, 0]] + rows['A'][3:]
    assert pixelcnn_prior.raster_mask(5, include_centre=False).tolist() == rows['A']
    assert pixelcnn_prior.raster_mask(5, include_centre=True).tolist() == rows['B']
    assert pixelcnn_prior.vertical_mask(3, include_centre_row=False).tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert pixelcnn_prior.vertical_mask(3, include_centre_row=True).tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert pixelcnn_prior.horizontal_mask(3, include_centre=False).tolist() == [[1, 0, 0]]
    assert pixelcnn_prior.horizontal_mask(3, include_centre=True).tolist() == [[1, 1, 0]]
    assert pixelcnn_prior.vertical_mask(5, include_centre_row=False).tolist() == rows['A'][:2] + [[0] * 5] * 3
    assert pixelcnn_prior.horizontal_mask(5, include_centre=True).tolist() == [rows['B'][2]]
    torch.manual_seed(0)
    conv = pixelcnn_prior.MaskedConv2d(2, 3, pixelcnn_prior.raster_mask(3, include_centre=True))
    x = torch.randn(1, 2, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1), atol=1e-6)


def test_nll_per_grid_and_loss_terms_by_hand():
    """-log p(c) per grid is the sum over positions of -log softmax(logits)[c]; the loss is per code."""
    torch.manual_seed(0)
    prior = pixelcnn_prior.PixelCNN(num_codes=5, hidden=8, layers=1)
    codes = torch.randint(0, 5, (3, 4, 4))
    with torch.no_grad():
        log_p = torch.log_softmax(prior(codes), dim=1)  # (3, 5, 4, 4)
        by_hand = torch.tensor([-sum(float(log_p[b, codes[b, i, j], i, j]) for i in range(4) for j in range(4))
                                for b in range(3)])  # (3,)
        terms = pixelcnn_prior.loss_terms(prior, codes)
        assert torch.allclose(pixelcnn_prior.nll_per_grid(prior, codes), by_hand, atol=1e-5)
    assert float(terms['nll']) == pytest.approx(float(by_hand.mean()) / 16, rel=1e-5)
    assert float(terms['bits_per_code']) == pytest.approx(float(by_hand.mean()) / 16 / math.log(2), rel=1e-5)


def test_gated_layers_after_the_first_are_residual():
    """With the horizontal output zeroed, a later layer passes h through unchanged (h + 0); the first layer,
    which must not pass on its input at (i, j), returns 0."""
    torch.manual_seed(0)
    v, h = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    for is_first in (True, False):
        layer = pixelcnn_prior.GatedLayer(4, is_first)
        torch.nn.init.zeros_(layer.h_out.weight)
        torch.nn.init.zeros_(layer.h_out.bias)
        v_out, h_out = layer(v, h)
        assert v_out.shape == v.shape and torch.equal(h_out, torch.zeros_like(h) if is_first else h)


@pytest.mark.parametrize('arch', ['pixelcnn', 'gated'])
def test_prior_is_causal(arch):
    torch.manual_seed(0)
    prior = pixelcnn_prior.ARCHS[arch](num_codes=10, hidden=8, layers=12).double()
    blind = 0
    for p in range(64):
        g = input_gradients(prior, p)
        assert torch.count_nonzero(g[p:]) == 0, f'position {p} sees itself or a later position'
        blind += int((g[:p] == 0).sum())
    if arch == 'gated':
        assert blind == 0  # every earlier position reaches every output: no blind spot
    else:
        assert blind > 0  # the plain PixelCNN misses some earlier positions: its blind spot
        g = input_gradients(prior, 56)  # first position of the last row
        assert g[6 * 8 + 7] == 0 and g[6 * 8] > 0  # blind to the row above's far right, not its left


def test_vqvae_then_priors_end_to_end(image_dir, tmp_path):
    vq_out = str(tmp_path / 'vq')
    vqvae.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '2', '--batch-size', '16',
                '--num-codes', '16', '--code-dim', '32', '--out', vq_out])
    for name in ('reconstructions.png', 'code_usage.png', 'curves.png'):
        assert is_png(os.path.join(vq_out, name)), name
    m = read_metrics(vq_out)
    assert set(m['final_test']) >= {'loss', 'recon_mse', 'codebook', 'commitment', 'perplexity', 'codes_used'}
    assert 1 <= m['final_test']['perplexity'] <= 16 and 1 <= m['final_test']['codes_used'] <= 16
    assert m['test_history']['recon_mse'][-1] < m['test_history']['recon_mse'][0]
    ckpt = torch.load(os.path.join(vq_out, 'model.pt'), weights_only=True)  # final_test, recomputed by hand on
    model = vqvae.VQVAE(3, 16, 32)  # the test images
    model.load_state_dict(ckpt['model'])
    with torch.no_grad():
        x = common.load_images('cifar10', image_dir)[1]
        x_hat, z_e, z_q, codes = model.eval()(x)
    p = torch.bincount(codes.flatten(), minlength=16) / codes.numel()
    f = m['final_test']
    assert f['recon_mse'] == pytest.approx(float(((x_hat - x) ** 2).mean()), rel=1e-5)
    assert f['eq3_loss'] == pytest.approx(float(((x_hat - x) ** 2).mean() + 2 * ((z_e - z_q) ** 2).mean()), rel=1e-5)
    assert f['codes_used'] == int((p > 0).sum())
    assert f['perplexity'] == pytest.approx(float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())), rel=1e-5)
    for arch in ('pixelcnn', 'gated'):
        out = str(tmp_path / arch)
        pixelcnn_prior.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--vqvae',
                             os.path.join(vq_out, 'model.pt'), '--arch', arch, '--epochs', '2', '--batch-size', '16',
                             '--hidden', '16', '--layers', '8', '--out', out] + ['--precision', 'fp16'] * (arch == 'gated'))
        for name in ('samples.png', 'temperatures.png', 'curves.png'):
            assert is_png(os.path.join(out, name)), name
        m = read_metrics(out)
        f = m['final_test']
        assert m['ran_on']['precision'] == ('fp16' if arch == 'gated' else common.choose_precision(
            'auto', common.machine_facts(torch.device('cpu')))[0])  # fp16: through the GradScaler
        assert 0 < f['nll'] < math.log(16) + 0.5 and f['bits_per_code'] == pytest.approx(f['nll'] / math.log(2))
        assert f['bits_per_dim'] > 0 and read_metrics(out)['sample_seconds_100'] > 0


def test_sampling_at_a_tiny_temperature_takes_the_argmax_in_raster_order():
    torch.manual_seed(0)
    prior = pixelcnn_prior.ARCHS['gated'](num_codes=10, hidden=8, layers=4)
    codes = pixelcnn_prior.sample(prior, 3, (4, 4), 1e-6, 'cpu')
    with torch.no_grad():
        for p in range(16):  # position by position: the most likely code given the codes drawn before it
            i, j = divmod(p, 4)
            earlier = codes.clone().view(3, 16)
            earlier[:, p:] = 0  # what the sampler had when it drew position p
            assert torch.equal(prior(earlier.view(3, 4, 4))[:, :, i, j].argmax(1), codes[:, i, j])


class CountingPrior(torch.nn.Module):
    """A causal stand-in with a known answer: at raster position p it is sure of (code at p - 1) + 1 mod K,
    and of 3 at p = 0. Sampled in raster order, every grid must read 3, 4, 5, ... in raster order."""
    def forward(self, codes):
        b, h, w = codes.shape
        before = torch.cat([torch.full((b, 1), 2), codes.flatten(1)[:, :-1]], 1)  # code at p - 1: (B, H*W)
        return 1e4 * F.one_hot((before + 1) % 10, 10).float().view(b, h, w, 10).permute(0, 3, 1, 2)


def test_sampling_goes_in_raster_order_and_writes_each_position():
    codes = pixelcnn_prior.sample(CountingPrior(), 2, (3, 4), 1.0, 'cpu')
    assert codes.flatten(1).tolist() == [[(3 + p) % 10 for p in range(12)]] * 2


def test_the_priors_codes_come_from_the_vqvae_in_eval_mode(image_dir, tmp_path):
    vq_out = str(tmp_path / 'vq')
    vqvae.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '1', '--batch-size', '16',
                '--num-codes', '8', '--code-dim', '16', '--out', vq_out])
    vq, _ = pixelcnn_prior.load_vqvae(pixelcnn_prior.parse_args(['--dataset', 'cifar10', '--vqvae',
                                                                  vq_out + '/model.pt']), 'cpu')
    x = common.load_images('cifar10', image_dir)[1]
    together, alone = pixelcnn_prior.encode(vq, x, 1.0), pixelcnn_prior.encode(vq, x, 1.0, batch_size=1)
    assert torch.equal(together[0], alone[0]) and torch.allclose(together[1], alone[1])  # batch-independent


def test_vq_and_prior_bound_by_hand(image_dir, tmp_path):
    """-log p(x) <= -log N(x; x_hat(z_q), s^2 I) - sum_i log p(c_i | c_<i), recomputed with torch.distributions
    and a loop over the 64 positions, against what pixelcnn_prior.py reports."""
    vq_out, out = str(tmp_path / 'vq'), str(tmp_path / 'prior')
    vqvae.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '1', '--batch-size', '16',
                '--num-codes', '8', '--code-dim', '16', '--out', vq_out])
    f = pixelcnn_prior.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--vqvae', vq_out + '/model.pt',
                             '--epochs', '1', '--batch-size', '16', '--hidden', '8', '--layers', '2',
                             '--decoder-std', '0.5', '--out', out])['final_test']
    args = pixelcnn_prior.parse_args(['--dataset', 'cifar10', '--vqvae', vq_out + '/model.pt'])
    vq, _ = pixelcnn_prior.load_vqvae(args, 'cpu')
    ckpt = torch.load(out + '/model.pt', weights_only=True)
    prior = pixelcnn_prior.ARCHS['gated'](8, 8, 2)
    prior.load_state_dict(ckpt['model'])
    x = common.load_images('cifar10', image_dir)[1]  # the 16 test images
    with torch.no_grad():
        x_hat, _, _, codes = vq(x)
        recon = -torch.distributions.Normal(x_hat, 0.5).log_prob(x).flatten(1).sum(1)  # (16,)
        log_p = torch.log_softmax(prior(codes), dim=1)  # (16, K, 8, 8)
        prior_nll = -sum(log_p[n, codes[n, i, j], i, j] for n in range(16) for i in range(8) for j in range(8)) / 16
    bound = recon.mean() + prior_nll
    assert f['neg_log_px_bound'] == pytest.approx(float(bound), rel=1e-4)
    # the same bound for 8-bit pixels: each pixel's Gaussian mass over its level's bin, at the fitted scale
    normal = torch.distributions.Normal(x_hat.double(), f['discrete_scale'])
    upper = torch.where(x == 1, 1.0, normal.cdf(x.double() + 1 / 255))
    lower = torch.where(x == -1, 0.0, normal.cdf(x.double() - 1 / 255))
    recon_discrete = -(upper - lower).log().flatten(1).sum(1)  # (16,)
    assert f['bits_per_dim_discrete'] == pytest.approx(float((recon_discrete.mean() + prior_nll) / 3072 / math.log(2)),
                                                       rel=1e-4)
    assert f['bits_per_dim'] == pytest.approx(float(bound / 3072 / math.log(2) + math.log2(127.5)), rel=1e-4)


def test_prior_test_nll_is_fp32_whatever_the_precision():
    torch.manual_seed(0)
    prior, codes = pixelcnn_prior.ARCHS['gated'](10, 8, 3), torch.randint(0, 10, (6, 8, 8))
    a, b = (pixelcnn_prior.evaluate(prior, codes, pixelcnn_prior.parse_args(['--batch-size', '4'] + flag))
            for flag in (['--precision', 'bf16'], []))
    with torch.no_grad():
        by_hand = F.cross_entropy(prior(codes), codes, reduction="sum") / codes.numel()
    assert a == b and a['nll'] == pytest.approx(float(by_hand), rel=1e-6)


def test_prior_without_vqvae_says_what_to_run(image_dir, tmp_path):
    with pytest.raises(SystemExit) as e:  # the command it suggests writes where --vqvae looks
        pixelcnn_prior.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--vqvae', str(tmp_path / 'vq/model.pt'),
                             '--out', str(tmp_path / 'prior')])
    assert f'python vqvae.py --dataset cifar10 --data-dir {image_dir} --out {tmp_path / "vq"}' in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # a file vqvae.py would not have written
        pixelcnn_prior.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--vqvae', str(tmp_path / 'no.pt'),
                             '--out', str(tmp_path / 'prior')])
    assert 'no VQ-VAE checkpoint at' in str(e.value.code) and 'vqvae.py wrote' in str(e.value.code)
    assert not (tmp_path / 'prior').exists()


# ------------------------------------------------------------------------------------------------------- data

def test_data_zip_loader(tmp_path):
    train = np.zeros((3, 32, 32, 3), np.uint8)
    train[0, 0, 0] = (0, 255, 128)
    write_pkl(tmp_path / 'cifar10.pkl', train, np.full((2, 32, 32, 3), 255, np.uint8))
    x, y = common.load_images('cifar10', str(tmp_path))
    assert x.shape == (3, 3, 32, 32) and y.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)
    assert (y == 1).all() and x.min() >= -1
    write_pkl(tmp_path / 'mnist.pkl', np.full((2, 28, 28), 255, np.uint8), np.zeros((1, 28, 28), np.uint8))
    refused(lambda d: common.load_images('mnist', d), str(tmp_path), "'test' holds 1 images")  # no variance of one
    write_pkl(tmp_path / 'mnist.pkl', np.full((2, 28, 28), 255, np.uint8), np.zeros((2, 28, 28), np.uint8))
    x, _ = common.load_images('mnist', str(tmp_path))
    assert x.shape == (2, 1, 32, 32)
    assert (x[:, :, 2:30, 2:30] == 1).all() and (x[:, :, :2] == -1).all()  # zero-padded to 32x32
    with open(tmp_path / 'cifar10.pkl', 'wb') as f:  # protocol 2 spells the bytes through _codecs.encode
        pickle.dump({'train': train, 'test': train}, f, protocol=2)
    assert common.load_images('cifar10', str(tmp_path))[0][0, :, 0, 0].tolist() == pytest.approx(
        [-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


def write_torchvision_files(root, name, train, test):
    """Tiny copies of the files torchvision downloads, in its own formats: SVHN's .mat (X as (H, W, C, N)),
    CIFAR-10's pickled batches (rows of 3072 bytes, channel-major) and MNIST's raw idx files."""
    if name == 'svhn':
        for split, a in (('train', train), ('test', test)):
            scipy.io.savemat(root / f'{split}_32x32.mat', {'X': a.transpose(1, 2, 3, 0), 'y': np.ones((len(a), 1))})
    elif name == 'cifar10':
        folder = root / 'cifar-10-batches-py'
        folder.mkdir()
        parts = [(f'data_batch_{i + 1}', part) for i, part in enumerate(np.array_split(train, 5))]
        for file, a in parts + [('test_batch', test)]:
            with open(folder / file, 'wb') as f:
                pickle.dump({'data': a.transpose(0, 3, 1, 2).reshape(len(a), -1), 'labels': [0] * len(a)}, f)
        with open(folder / 'batches.meta', 'wb') as f:
            pickle.dump({'label_names': ['airplane']}, f)
    else:
        raw = root / 'MNIST' / 'raw'
        raw.mkdir(parents=True)
        for prefix, a in (('train', train), ('t10k', test)):
            (raw / f'{prefix}-images-idx3-ubyte').write_bytes(struct.pack('>IIII', 2051, len(a), 28, 28) + a.tobytes())
            (raw / f'{prefix}-labels-idx1-ubyte').write_bytes(struct.pack('>II', 2049, len(a)) + bytes(len(a)))


@pytest.mark.parametrize('name', ['svhn', 'cifar10', 'mnist'])
def test_torchvision_formats_offline(name, tmp_path, monkeypatch):
    """The path a user without the course's .pkl takes: torchvision's own files, read offline (only the
    md5 check is bypassed; nothing is downloaded), then one tiny end-to-end run."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn
    import torchvision.datasets.utils  # SVHN's download() asks download_url, which checks the md5 itself
    for module in (torchvision.datasets.cifar, torchvision.datasets.svhn, torchvision.datasets.utils):
        monkeypatch.setattr(module, 'check_integrity', lambda path, md5=None: os.path.isfile(path))
    size, channels = (28, 1) if name == 'mnist' else (32, 3)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 100, (20, size, size, channels), dtype=np.uint8)
    test = rng.integers(0, 100, (10, size, size, channels), dtype=np.uint8)
    train[3, 4, 7, channels - 1] = 255  # one marked pixel: image 3, row 4, column 7, last channel
    test[2, 9, 1, 0] = 200
    data = tmp_path / 'data'
    data.mkdir()
    write_torchvision_files(data, name, train[..., 0] if name == 'mnist' else train,
                            test[..., 0] if name == 'mnist' else test)
    x, y = common.load_images(name, str(data))
    pad = (32 - size) // 2  # MNIST sits zero-padded in the middle of a 32x32 frame
    assert x.shape == (20, channels, 32, 32) and y.shape == (10, channels, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() == 1.0 and x[3, channels - 1, 4 + pad, 7 + pad] == 1.0
    assert y[2, 0, 9 + pad, 1 + pad] == pytest.approx(200 / 127.5 - 1)
    expected = torch.from_numpy(train).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, H, W, C) -> (N, C, H, W)
    assert torch.equal(x[:, :, pad:pad + size, pad:pad + size], expected)  # every pixel where it went in
    m = vae_image.main(['--dataset', name, '--data-dir', str(data), '--epochs', '1', '--batch-size', '8',
                        '--iw-samples', '2', '--iw-examples', '4', '--out', str(tmp_path / 'run')])
    assert m['final_test']['mse'] > 0 and m['dataset'] == name


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / 'payload-ran'
    write_pkl(tmp_path / 'cifar10.pkl', Hostile(marker), Hostile(marker))
    with pytest.raises(SystemExit) as e:
        common.load_images('cifar10', str(tmp_path))
    assert 'not a numpy array' in str(e.value.code) and 'cifar10.pkl' in str(e.value.code)
    assert not marker.exists()


# ------------------------------------------------------------------------------- precision and devices

CPU_AVX2 = {'device': 'cpu', 'cpu_isa': 'AVX2', 'amx': False, 'bf16_speedup': None, 'cuda_capability': None}


@pytest.mark.parametrize('machine, expected', [
    (CPU_AVX2, 'fp32'),                                                # AMD and Intel laptops, AMD desktops
    ({**CPU_AVX2, 'cpu_isa': 'AVX512', 'bf16_speedup': 0.4}, 'fp32'),  # AVX-512 without bf16 (Skylake-X)
    ({**CPU_AVX2, 'cpu_isa': 'AVX512', 'bf16_speedup': 0.9}, 'fp32'),  # a Xeon held to AVX-512 bf16, no AMX
    ({**CPU_AVX2, 'cpu_isa': 'AVX512', 'bf16_speedup': 1.8}, 'bf16'),  # AMD Zen 4: bf16 at full width, fp32 at half
    ({**CPU_AVX2, 'cpu_isa': 'AVX512', 'amx': True}, 'bf16'),         # Xeon since Sapphire Rapids
    ({**CPU_AVX2, 'amx': True}, 'fp32'),                              # the same, run as an AVX2 CPU
    ({**CPU_AVX2, 'cpu_isa': 'DEFAULT'}, 'fp32'),                     # ARM
    ({**CPU_AVX2, 'device': 'mps'}, 'fp32'),                          # Apple Silicon
    ({**CPU_AVX2, 'device': 'cuda', 'cuda_capability': (7, 5)}, 'fp16'),  # T4 (Colab), RTX 20xx
    ({'device': 'cuda', 'cpu_isa': 'AVX512', 'amx': True, 'cuda_capability': (7, 0)}, 'fp16'),  # the GPU decides
    ({**CPU_AVX2, 'device': 'cuda', 'cuda_capability': (7, 0)}, 'fp16'),  # V100
    ({**CPU_AVX2, 'device': 'cuda', 'cuda_capability': (8, 0)}, 'bf16'),  # A100
    ({**CPU_AVX2, 'device': 'cuda', 'cuda_capability': (8, 6)}, 'bf16'),  # RTX 30xx
    ({**CPU_AVX2, 'device': 'cuda', 'cuda_capability': (9, 0)}, 'bf16')])  # H100
def test_auto_precision_for_each_kind_of_machine(machine, expected):
    assert common.choose_precision('auto', machine) == (expected, 'auto')
    assert common.choose_precision('fp32', machine) == ('fp32', 'asked')  # never second-guessed


def test_a_slow_explicit_precision_runs_with_a_note():
    assert common.choose_precision('bf16', CPU_AVX2) == ('bf16', 'asked; likely slower than fp32 on this cpu')
    assert common.choose_precision('fp16', {**CPU_AVX2, 'cpu_isa': 'AVX512', 'amx': True})[1].endswith('than bf16 on this cpu')
    t4 = {**CPU_AVX2, 'device': 'cuda', 'cuda_capability': (7, 5)}
    assert common.choose_precision('bf16', t4) == ('bf16', 'asked; likely slower than fp16 on this cuda')  # emulated
    assert common.choose_precision('fp16', {**t4, 'cuda_capability': (8, 0)}) == ('fp16', 'asked')


def test_the_cpus_facts_follow_what_torch_is_told_to_use(monkeypatch):
    """An AMX Xeon run as an AVX2 laptop (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) counts as one; bf16 is
    measured on AVX-512 CPUs without AMX only (here a stand-in for the measurement says 0.9)."""
    monkeypatch.setattr(common, '_bf16_speedup', lambda: 0.9)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True, raising=False)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX512')
    monkeypatch.delenv('ONEDNN_MAX_CPU_ISA', raising=False)
    monkeypatch.delenv('DNNL_MAX_CPU_ISA', raising=False)
    assert common.choose_precision('auto', common.machine_facts(torch.device('cpu')))[0] == 'bf16'
    assert common.machine_facts(torch.device('cpu'))['bf16_speedup'] is None  # AMX: not measured
    for isa in ('AVX2', 'AVX512_CORE_BF16'):
        monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', isa)
        facts = common.machine_facts(torch.device('cpu'))
        assert not facts['amx'] and facts['bf16_speedup'] == 0.9 and common.choose_precision('auto', facts)[0] == 'fp32'
    assert common.machine_facts(torch.device('cpu'), measure=False)['bf16_speedup'] is None  # vae_2d: no --precision
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX512_CORE_AMX')
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    assert common.choose_precision('auto', common.machine_facts(torch.device('cpu')))[0] == 'fp32'
    assert common.machine_facts(torch.device('cpu'))['bf16_speedup'] is None  # AVX2: bf16 is 14-35x slower, unmeasured


def test_the_bf16_measurement_leaves_the_runs_random_stream_alone():
    before = torch.get_rng_state()
    speedup = common._bf16_speedup.__wrapped__()  # measured afresh, not the process's cached figure
    assert torch.equal(torch.get_rng_state(), before) and 0 < speedup < math.inf


def fp16_steps(model, loss, steps=14, clip=0.0):
    """Adam steps on one fixed batch under fp16 autocast and the GradScaler: the loss at each step. The
    scaler starts at 2^16 and halves at each step whose gradients overflow, skipping it."""
    amp = common.Amp(torch.device('cpu'), 'fp16')
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    values = []
    for _ in range(steps):
        with amp.autocast():
            value = loss()
        amp.step(value, optimizer, clip)
        values.append(float(value.detach()))
    assert amp.scaler.is_enabled() and 1 < amp.scaler.get_scale() <= 2**16  # the scaled path, not plain fp32
    return values


@pytest.mark.parametrize('name', ['vae_image', 'vlae', 'vqvae', 'gated', 'pixelcnn'])
def test_fp16_with_a_grad_scaler_trains_every_image_model(name):
    """Each image script's loss under fp16 autocast on the CPU, through the GradScaler (and clipping for the
    VQ-VAE): finite at every step, and lower after 14 steps on the same batch (fp16 is slow on most CPUs: 2
    images)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    if name in ('vae_image', 'vlae'):
        prior = vlae.FlowPrior(16, 64) if name == 'vlae' else None
        model = vae_image.VAE(3, 16, 1.0, prior=prior)
        loss = (vlae if prior else vae_image).loss_terms
        values = fp16_steps(model, lambda: loss(model, x)['neg_elbo'] if torch.manual_seed(1) else None)  # same z noise
    elif name == 'vqvae':  # recon must fall; the commitment grows as the encoder moves (no EMA codebook steps here)
        model, values = vqvae.VQVAE(3, 16, 32), []
        fp16_steps(model, lambda: values.append(terms := vqvae.loss_terms(model, x, 1.0)) or terms['loss'], clip=1.0)
        values = [float(t['recon_mse'].detach()) for t in values]
    else:
        model, codes = pixelcnn_prior.ARCHS[name](16, 16, 4), torch.randint(0, 16, (2, 8, 8))
        values = fp16_steps(model, lambda: pixelcnn_prior.loss_terms(model, codes)['nll'])
    assert all(math.isfinite(v) for v in values) and values[-1] < min(values[:3]), values


def test_fp16_clips_the_true_gradients():
    """Amp.step unscales before clipping: the gradient that the step uses has norm --clip-grad, not a
    65,536th of it (clipping the scaled gradients, then dividing them by the scale)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the gradients matter
    amp = common.Amp(torch.device('cpu'), 'fp16')
    with amp.autocast():
        loss = model(torch.randn(4, 8)).float().mean() / 16  # gradient norm 0.11; times 65,536 inside fp16
    amp.step(loss, optimizer, clip=0.01)
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert amp.scaler.get_scale() == 2**16 and norm == pytest.approx(0.01, rel=1e-3)  # no overflow; clipped


def test_fp16_keeps_the_flows_exp_in_fp32():
    """fp16's exp overflows above 11.09: under autocast the MADE's outputs are fp32, so a large log sigma is
    a large, finite sigma."""
    prior = vlae.FlowPrior(4, 8)
    torch.nn.init.constant_(prior.made.net[-1].bias, 12.0)
    with torch.autocast('cpu', dtype=torch.float16):
        eps, log_sigma = prior(torch.ones(2, 4))
    assert log_sigma.dtype == torch.float32 and torch.isfinite(eps).all() and torch.isfinite(prior.log_prob(torch.ones(2, 4))).all()


class DeviceFloat64Watch(torch.overrides.TorchFunctionMode):
    """Stands in for a GPU or a Mac on a CPU-only machine: a tensor counts as on the device once it went
    through .to(<torch.device>) or was made with device=, as main does it; .cpu() brings it back to the host,
    and every result of an op with an input on the device is on the device too. A float64 made on the
    device is recorded: MPS has no float64, and a CUDA float64 is slow."""
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = getattr(func, '__name__', str(func))
        if name == 'cpu':
            out, on_device = out.clone() if out is args[0] else out, False  # a copy of its own: marks differ
        elif name == 'to' and any(isinstance(a, torch.device) for a in list(args[1:]) + list(kwargs.values())):
            on_device = True
        else:
            on_device = any(getattr(t, 'on_device', False) for t in inputs) or isinstance(kwargs.get('device'), torch.device)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and on_device:
                t.on_device = True
                if t.dtype == torch.float64:
                    self.found.append(name)
        return out


def test_nothing_in_float64_on_a_device_path(image_dir, tmp_path):
    """The image VAE's and the prior's final metrics (the discrete likelihood, fitted scale, IW bound) under
    the watch above: no float64 tensor on the device. (The old discrete_log_prob's x.double() was one.)"""
    torch.manual_seed(0)
    model, x = vae_image.VAE(3, 16, 1.0), torch.rand(12, 3, 32, 32) * 2 - 1
    args = vae_image.make_parser().parse_args(['--iw-samples', '2', '--iw-examples', '4'])
    with DeviceFloat64Watch() as watch:
        x = x.to(torch.device('cpu'))
        vae_image.final_metrics(model, x, x, args)
        vq = vqvae.VQVAE(3, 8, 16).to(torch.device('cpu')).eval()
        with torch.no_grad():
            vae_image.discrete_log_prob(x, vq(x)[0], 0.05)
            x.double()  # the watch itself: this is what it must see
    assert watch.found == ['double'], watch.found


def test_the_device_random_stream_is_saved_beside_the_cpus(monkeypatch, tmp_path):
    """A resumed CUDA or MPS run draws on from where it stopped: the checkpoint keeps that device's stream
    (stood in for here by a fake 'cuda' device whose stream is a tensor)."""
    stream = {'state': torch.tensor([1, 2, 3], dtype=torch.uint8)}
    fake = types.SimpleNamespace(get_rng_state=lambda: stream['state'].clone(),
                                 set_rng_state=lambda s: stream.update(state=s.clone()))
    monkeypatch.setattr(torch, 'cuda', fake)
    saved = common._device_rng(torch.device('cuda'))
    stream['state'] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    common._device_rng(torch.device('cuda'), saved['cuda'])
    assert stream['state'].tolist() == [1, 2, 3] and common._device_rng(torch.device('cpu')) == {}


def test_a_run_says_where_it_ran(tmp_path, capsys):
    m = vae_2d.main(TWO_EPOCHS + ['--out', str(tmp_path)])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith('running on cpu (') and 'in fp32' in first and f'{torch.get_num_threads()} CPU threads' in first
    assert m['ran_on'] == {'device': 'cpu', 'precision': 'fp32', 'threads': torch.get_num_threads(),
                           'torch': torch.__version__} and m['config']['device'] == 'auto'


# -------------------------------------------------------------------------------------- runs a user can trust

def test_same_seed_gives_same_metrics(tmp_path):
    a, b = (vae_2d.main(['--epochs', '2', '--subset', '1000', '--out', str(tmp_path / n), '--iw-samples', '5'])
            for n in 'ab')
    assert a['final_test'] == b['final_test'] and a['test_history'] == b['test_history']
    c = vae_2d.main(['--epochs', '2', '--subset', '1000', '--out', str(tmp_path / 'c'), '--iw-samples', '5',
                     '--seed', '1'])
    assert c['final_test'] != a['final_test']


def files(folder):
    """{name: bytes} of every file in folder (recursively), but the lock's empty file: to check that a refused
    run touched nothing."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), 'rb').read()
            for d, _, names in os.walk(folder) for n in names if n != '.lock'}


def split_command(text):
    """A command line as this system's shell splits it: CommandLineToArgvW on Windows, POSIX rules elsewhere."""
    if os.name != 'nt':
        return shlex.split(text)
    import ctypes
    argc, split = ctypes.c_int(), ctypes.windll.shell32.CommandLineToArgvW
    split.restype = ctypes.POINTER(ctypes.c_wchar_p)
    argv = split(text, ctypes.byref(argc))
    return [argv[i] for i in range(argc.value)]


FP32 = common.Amp(torch.device('cpu'), 'fp32')


def after_first_checkpoint(out, action):
    """A stand-in for vae_2d.loss_terms that returns action(terms) once --out/model.pt exists, i.e. from
    the second epoch on, whatever the number of batches."""
    real = vae_2d.loss_terms

    def loss_terms(model, x):
        terms = real(model, x)
        return action(terms) if os.path.exists(os.path.join(out, 'model.pt')) else terms
    return loss_terms


def ctrl_c(*_):
    raise KeyboardInterrupt


TWO_EPOCHS = ['--epochs', '2', '--subset', '1000', '--iw-samples', '5']


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    args = ['--epochs', '3', '--subset', '1000', '--iw-samples', '5']
    whole = vae_2d.main(args + ['--out', str(tmp_path / 'whole')])
    out = str(tmp_path / 'cut')
    monkeypatch.setattr(vae_2d, 'loss_terms', after_first_checkpoint(out, ctrl_c))
    with pytest.raises(SystemExit) as e:
        vae_2d.main(args + ['--out', out])
    message = capsys.readouterr().err.strip()
    assert e.value.code == 130 and '\n' not in message and 'holds epoch 1 of 3' in message
    command = split_command(message.split('Continue with: ')[1])  # quoted for this system's shell, this Python
    assert command == [sys.executable, 'vae_2d.py'] + args + ['--out', out, '--resume']
    assert sorted(os.listdir(out)) == ['.lock', 'model.pt']  # no temp file left (the lock's empty file stays)
    monkeypatch.undo()
    resumed = vae_2d.main(args + ['--out', out, '--resume'])
    assert resumed['final_test'] == whole['final_test'] and resumed['test_history'] == whole['test_history']

    os.remove(os.path.join(out, 'samples.png'))  # --sample-only redraws from model.pt, no training
    again = vae_2d.main(args + ['--out', out, '--sample-only'])
    assert os.path.exists(os.path.join(out, 'samples.png')) and again['epochs_trained'] == 3


def test_the_continue_command_keeps_every_word_but_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an --out whose name ends like a flag: ./resume
    monkeypatch.setattr(vae_2d, 'loss_terms', after_first_checkpoint('./resume', ctrl_c))
    with pytest.raises(SystemExit):
        vae_2d.main(TWO_EPOCHS + ['--out', './resume'])
    command = split_command(capsys.readouterr().err.split('Continue with: ')[1])
    assert command[2:] == TWO_EPOCHS + ['--out', './resume', '--resume']


def test_a_new_run_never_replaces_a_trained_model(tmp_path):
    out = str(tmp_path / 'run')
    vae_2d.main(TWO_EPOCHS + ['--out', out])
    before = files(out)
    message = refused(vae_2d.main, TWO_EPOCHS + ['--out', out, '--seed', '1'], 'already holds a run (epoch 2 of 2)',
                      '--resume', '--overwrite', '--out DIR')
    assert message.startswith(f'error: {out} ') and files(out) == before


def test_overwrite_starts_again_in_a_clean_folder(tmp_path, capsys):
    out = tmp_path / 'run'
    first = vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    (out / 'notes.png').write_bytes(b'the user\'s, not the run\'s')
    metrics = read_metrics(out)  # as if the old run had also drawn a picture the new one does not
    (out / 'metrics.json').write_text(json.dumps({**metrics, 'pictures': metrics['pictures'] + ['old.png']}))
    (out / 'old.png').write_bytes(b'from the old run')
    second = vae_2d.main(['--epochs', '1', '--subset', '1000', '--iw-samples', '5', '--seed', '1', '--out', str(out),
                          '--overwrite'])
    assert not (out / 'old.png').exists() and (out / 'notes.png').exists() and second['epochs_trained'] == 1
    assert sorted(os.listdir(out)) == sorted(['.lock', 'model.pt', 'metrics.json', 'notes.png'] + second['pictures'])
    assert torch.load(out / 'model.pt', weights_only=True)['epoch'] == 1 and second['final_test'] != first['final_test']
    with pytest.raises(SystemExit) as e:  # argparse refuses the pair before anything is read or written
        vae_2d.main(TWO_EPOCHS + ['--out', str(out), '--overwrite', '--resume'])
    assert e.value.code == 2 and 'not allowed with argument --overwrite' in capsys.readouterr().err


def test_overwrite_that_fails_keeps_the_old_run_byte_for_byte(image_dir, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'run')
    run = ['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '1', '--batch-size', '32', '--iw-samples', '2',
           '--iw-examples', '4', '--out', out, '--overwrite']
    vae_image.main(run[:-1])
    before = files(out)
    absent = 'cuda' if not torch.cuda.is_available() else 'mps' if not torch.backends.mps.is_available() else None
    for bad in [['--data-dir', str(tmp_path / 'typo')], ['--subset', '1']] + [['--device', absent]] * bool(absent):
        refused(vae_image.main, run + bad)
        assert files(out) == before, bad
    monkeypatch.setattr(vae_image, 'train_epoch', ctrl_c)  # Ctrl-C in the first epoch
    with pytest.raises(SystemExit) as e:
        vae_image.main(run)
    assert e.value.code == 130 and 'kept as it was' in capsys.readouterr().err and files(out) == before
    monkeypatch.setattr(vae_image, 'train_epoch', lambda *a: {'neg_elbo': torch.tensor([math.nan])})  # NaN at once
    refused(vae_image.main, run, 'diverged', 'no checkpoint was written')
    assert files(out) == before


def test_overwrite_removes_only_what_the_checkpoints_run_wrote(image_dir, tmp_path):
    """A metrics.json the checkpoint's run did not write (a user's, or one saying another script) is no proof:
    --overwrite removes none of the pictures it lists. The run's own metrics.json carries its run_id."""
    out = tmp_path / 'run'
    first = vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    assert first['run_id'] == torch.load(out / 'model.pt', weights_only=True)['run_id']
    for foreign in ({'accuracy': 0.91, 'pictures': ['samples.png', 'mine.png']},
                    {**first, 'script': 'vqvae', 'run_id': 'someone else', 'pictures': ['mine.png']}):
        (out / 'mine.png').write_bytes(b'a picture of the user')
        (out / 'metrics.json').write_text(json.dumps(foreign))
        vae_2d.main(TWO_EPOCHS + ['--out', str(out), '--overwrite'])
        assert (out / 'mine.png').read_bytes() == b'a picture of the user'


def test_what_is_not_a_run_is_never_taken_for_one(tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    ours = {k: {} for k in common._KEYS} | {'config': {'epochs': 2, 'seed': 0, 'dataset': 'gaussian1'}}
    for foreign in ({'weight': torch.zeros(2)}, torch.zeros(3), [1, 2], {'model': {}, 'config': {}},
                    {k: v for k, v in ours.items() if k != 'segments'}, ours | {'config': {'epochs': 2}}):
        torch.save(foreign, out / 'model.pt')
        before = files(out)
        for flag in ([], ['--resume'], ['--sample-only'], ['--overwrite']):  # not even --overwrite replaces it
            refused(vae_2d.main, TWO_EPOCHS + ['--out', str(out)] + flag, 'is not a checkpoint of these scripts',
                    'move it away')
            assert files(out) == before
    (out / 'model.pt').unlink()
    (out / 'model.pt').mkdir()  # a folder where the checkpoint should be: even --overwrite stops
    (out / 'metrics.json').write_text('{"keep": 1}')
    for flag in ([], ['--overwrite']):
        refused(vae_2d.main, TWO_EPOCHS + ['--out', str(out)] + flag, 'model.pt is damaged or not a file',
                'move it away')
        assert (out / 'metrics.json').read_text() == '{"keep": 1}'


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    out, real_save = tmp_path / 'run', torch.save

    def full_disk(obj, path):  # the second epoch's temp file is half-written, then the device is full
        if obj['epoch'] == 2:
            real_save({'half': 1}, path)
            raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected pos 1 vs 0')
        real_save(obj, path)

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(RuntimeError, match='unexpected pos'):
        vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    assert sorted(os.listdir(out)) == ['.lock', 'model.pt']  # no temp file left
    assert torch.load(out / 'model.pt', weights_only=True)['epoch'] == 1  # the last whole checkpoint


def test_metrics_json_is_strict_json(tmp_path, monkeypatch):
    monkeypatch.setattr(vae_2d, 'iw_nll', lambda model, x, k: torch.full((len(x),), math.inf))  # an estimate overflows
    vae_2d.main(TWO_EPOCHS + ['--out', str(tmp_path)])

    def refuse(name):
        raise ValueError(f'{name} is not JSON')
    metrics = json.loads((tmp_path / 'metrics.json').read_text(), parse_constant=refuse)
    assert metrics['final_test']['nll_iw'] is None and metrics['final_test']['neg_elbo'] > 0


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    out = tmp_path / 'run'
    vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    (out / 'model.pt.tmp').write_bytes(b'half a checkpoint of a writer killed with -9')
    vae_2d.main(TWO_EPOCHS[2:] + ['--epochs', '3', '--out', str(out), '--resume'])
    assert not any(n.endswith('.tmp') for n in os.listdir(out))


HOLD_LOCK = """import os, sys, time
f = open(os.path.join(sys.argv[1], '.lock'), 'a+')
if os.name == 'nt':
    import msvcrt; msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
else:
    import fcntl; fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print('held', flush=True)
time.sleep(120)"""


def test_one_writer_per_folder_and_a_killed_writer_holds_nothing(tmp_path):
    """Another process holding --out's OS lock refuses a run and leaves the folder as it was; killed with
    SIGKILL (no clean-up of its own), its lock is gone at once and the next run goes ahead."""
    out = tmp_path / 'run'
    vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        before = files(out)
        refused(vae_2d.main, TWO_EPOCHS[2:] + ['--epochs', '3', '--out', str(out), '--resume'],
                'being written by another run', 'wait for it')
        assert files(out) == before
    finally:
        holder.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
        holder.wait()
    assert vae_2d.main(TWO_EPOCHS[2:] + ['--epochs', '3', '--out', str(out), '--resume'])['epochs_trained'] == 3


def test_runs_started_at_the_same_instant_never_share_a_folder(tmp_path):
    """Eight claims of one --out released at one barrier, five times over: the OS lock is taken before the
    folder is read, so no two claims are ever inside at once, and only the first inside finds no run there."""
    import threading
    for repeat in range(5):
        out, barrier, events = str(tmp_path / f'race{repeat}'), threading.Barrier(8), []

        def claim(i):
            args = vae_2d.parse_args(['--out', out, '--seed', str(i)])
            barrier.wait()
            try:
                with common.claim_out(args, 'vae_2d', []) as previous:
                    events.append(('in', i, previous))
                    if not os.path.exists(os.path.join(out, 'model.pt')):
                        torch.save({k: {} for k in common._KEYS} | {'config': {'epochs': 1, 'seed': i, 'dataset': 'x'},
                                   'script': 'vae_2d', 'epoch': 1, 'segments': []}, os.path.join(out, 'model.pt'))
                    events.append(('out', i, None))
            except SystemExit as e:
                events.append(('refused', i, str(e)))
        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        inside = [e[0] for e in events if e[0] != 'refused']
        assert inside == ['in', 'out'] * (len(inside) // 2)  # one claim at a time, never two inside
        assert sum(e[0] == 'in' for e in events) == 1  # after the first, each finds a run and is refused
        assert all('being written by another run' in e[2] or 'already holds a run' in e[2]
                   for e in events if e[0] == 'refused')
        winner = next(i for kind, i, _ in events if kind == 'in')
        assert torch.load(os.path.join(out, 'model.pt'), weights_only=True)['config']['seed'] == winner


def test_ctrl_c_after_training_keeps_everything_and_suggests_sample_only(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    seen = {}

    def interrupt_final_metrics(*_):
        seen.update(files(out))  # what is on disk at the moment of Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(vae_2d, 'iw_nll', interrupt_final_metrics)
    with pytest.raises(SystemExit) as e:
        vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    message = capsys.readouterr().err.strip()
    assert e.value.code == 130 and '\n' not in message and 'holds epoch 2 of 2' in message
    assert message.endswith('--sample-only') and files(out) == {k: v for k, v in seen.items() if k != '.lock'}


def test_ctrl_c_while_writing_the_checkpoint_names_the_epoch_on_disk(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    real_save = torch.save

    def save_then_ctrl_c(obj, path):
        real_save(obj, path)  # the temp file is written...
        if obj['epoch'] == 2:
            raise KeyboardInterrupt  # ...and Ctrl-C comes before the rename
    monkeypatch.setattr(torch, 'save', save_then_ctrl_c)
    with pytest.raises(SystemExit) as e:
        vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    assert e.value.code == 130 and 'holds epoch 1 of 2' in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ['.lock', 'model.pt']
    assert torch.load(out / 'model.pt', weights_only=True)['epoch'] == 1


def test_nan_in_the_first_epoch_says_nothing_was_saved(image_dir, tmp_path, monkeypatch):
    nan = torch.tensor(math.nan, requires_grad=True)
    monkeypatch.setattr(vae_image, 'loss_terms', lambda model, x: {'neg_elbo': nan * model.decoder_std})
    refused(vae_image.main, ['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '2',
                             '--out', str(tmp_path / 'new' / 'run')],
            'diverged', 'in epoch 1, batch 1', 'no checkpoint was written', '--lr', '--decoder-std')
    assert os.listdir(tmp_path / 'new') == []  # a failed start removes the folder it made (not its parents)


def test_nan_later_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / 'run')
    monkeypatch.setattr(vae_2d, 'loss_terms', after_first_checkpoint(
        out, lambda terms: {**terms, 'neg_elbo': terms['neg_elbo'] * math.nan}))
    refused(vae_2d.main, ['--epochs', '3', '--subset', '1000', '--out', out], 'diverged', 'in epoch 2, batch 1',
            'keeps epoch 1', '--resume')
    ckpt = torch.load(os.path.join(out, 'model.pt'), weights_only=True)
    assert ckpt['epoch'] == 1 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_a_loss_that_explodes_stops_like_a_nan(tmp_path, monkeypatch):
    out = str(tmp_path / 'run')
    monkeypatch.setattr(vae_2d, 'loss_terms', after_first_checkpoint(
        out, lambda terms: {**terms, 'neg_elbo': terms['neg_elbo'] * 1e6}))  # finite, but a million times larger
    refused(vae_2d.main, ['--epochs', '3', '--subset', '1000', '--out', out], 'diverged', 'in epoch 2, batch 1',
            'keeps epoch 1', '--lr')


def test_resume_refuses_a_changed_objective_and_records_segments(image_dir, tmp_path):
    out = str(tmp_path / 'run')
    run = ['--dataset', 'cifar10', '--data-dir', image_dir, '--batch-size', '32', '--iw-samples', '2',
           '--iw-examples', '4', '--out', out]
    vae_image.main(run + ['--epochs', '1'])
    before = files(out)
    refused(vae_image.main, run + ['--epochs', '2', '--resume', '--decoder-std', '0.5'], 'trained with --decoder-std 1.0',
            'this run has --decoder-std 0.5', 'Pass --decoder-std 1.0')
    refused(vae_image.main, run + ['--epochs', '2', '--resume', '--subset', '20'], 'trained with no --subset',
            'this run has --subset 20', 'Pass no --subset')
    assert files(out) == before
    m = vae_image.main(run + ['--epochs', '2', '--resume', '--lr', '1e-4', '--seed', '3'])
    assert m['segments'] == [{'from_epoch': 1, 'seed': 0, 'lr': 1e-3, 'batch_size': 32},
                             {'from_epoch': 2, 'seed': 3, 'lr': 1e-4, 'batch_size': 32}]


@pytest.mark.parametrize('script', ['vqvae', 'prior', 'vae_image'])
def test_a_test_number_no_model_can_reach_stops_as_diverged(script, image_dir, tmp_path, monkeypatch):
    """A run whose test number is ten times a naive model's (the prior's a uniform guess's log K; a VQ-VAE's
    recon 4, every pixel off by the whole range; the VAE's recon term likewise) stops as a NaN does, in
    whichever epoch, though every number is finite (as --lr 0.3 and 0.03 once did)."""
    data = ['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '2', '--batch-size', '32']
    if script == 'vae_image':
        real, key, main, argv = vae_image.evaluate, 'recon', vae_image.main, data + ['--iw-samples', '2']
    else:
        vqvae.main(data + ['--epochs', '1', '--num-codes', '8', '--code-dim', '16', '--out', str(tmp_path / 'vq')])
        real, key, main = (vqvae.evaluate, 'recon_mse', vqvae.main) if script == 'vqvae' else \
            (pixelcnn_prior.evaluate, 'nll', pixelcnn_prior.main)
        argv = data + (['--num-codes', '8', '--code-dim', '16'] if script == 'vqvae' else
                       ['--vqvae', str(tmp_path / 'vq' / 'model.pt'), '--hidden', '8', '--layers', '2'])
    worse = {'recon_mse': 40.1, 'nll': 10 * math.log(8) + 0.1, 'recon': 10 * (3072 / 2 * math.log(2 * math.pi) + 6145)}[key]
    calls = []

    def evaluate(*a):
        result = real(*a)
        calls.append(1)
        first = result[0] if isinstance(result, tuple) else result
        first[key] = worse if len(calls) == 2 else first[key]  # the second epoch's test set
        return result
    monkeypatch.setattr({'vqvae': vqvae, 'prior': pixelcnn_prior, 'vae_image': vae_image}[script], 'evaluate', evaluate)
    refused(main, argv + ['--out', str(tmp_path / 'run')], 'diverged', 'in epoch 2', f'test {key} ',
            'is over ten times', 'keeps epoch 1')
    assert torch.load(tmp_path / 'run' / 'model.pt', weights_only=True)['epoch'] == 1


def test_messages_that_say_what_to_do(image_dir, tmp_path):
    out = tmp_path / 'run'
    vae_2d.main(TWO_EPOCHS + ['--out', str(out)])
    refused(vae_2d.main, TWO_EPOCHS[2:] + ['--epochs', '1', '--out', str(out), '--resume'], 'trained 2 epochs',
            '--epochs 1', '--sample-only')
    (out / 'model.pt').write_bytes((out / 'model.pt').read_bytes()[:1000])  # a truncated checkpoint
    refused(vae_2d.main, TWO_EPOCHS + ['--out', str(out), '--resume'], 'model.pt is damaged', 'move it away')
    refused(vae_2d.main, TWO_EPOCHS + ['--out', ''], "--out ''")
    refused(vae_2d.main, ['--subset', '9', '--out', str(tmp_path / 'small')], '--subset 9 leaves 1 test examples')
    refused(vae_image.main, ['--dataset', 'cifar10', '--data-dir', os.path.join(image_dir, 'cifar10.pkl'),
                             '--out', str(tmp_path / 'x')], 'is not a folder', f'--data-dir {image_dir}')
    refused(vae_image.main, ['--dataset', 'cifar10', '--data-dir', image_dir, '--out', str(tmp_path / 'none'),
                             '--resume'], 'no checkpoint', f'--data-dir {image_dir}')
    empty = tmp_path / 'empty'
    empty.mkdir()
    write_pkl(empty / 'cifar10.pkl', np.zeros((4, 32, 32, 3), np.uint8), np.zeros((0, 32, 32, 3), np.uint8))
    refused(vae_image.main, ['--dataset', 'cifar10', '--data-dir', str(empty), '--out', str(tmp_path / 'e')],
            "'test' holds 0 images")
    with pytest.raises(SystemExit) as e:
        pixelcnn_prior.parse_args(['--temperature', '1e-9'])
    assert e.value.code == 2
    assert not any((tmp_path / name).exists() for name in ('small', 'x', 'none', 'e'))  # no empty folders left
    refused(vae_image.main, ['--dataset', 'cifar10', '--data-dir', '', '--out', str(tmp_path / 'd')],
            "--data-dir '' is not a folder", '--data-dir ./data')
    (tmp_path / 'lockdir' / '.lock').mkdir(parents=True)
    refused(vae_2d.main, TWO_EPOCHS + ['--out', str(tmp_path / 'lockdir')], '.lock is a folder', 'move it away')


def test_resuming_a_finished_run_adds_no_segment(tmp_path):
    out = str(tmp_path / 'run')
    vae_2d.main(TWO_EPOCHS + ['--out', out])
    again = vae_2d.main(TWO_EPOCHS + ['--out', out, '--resume'])  # nothing left to train: metrics and pictures only
    assert again['epochs_trained'] == 2 and len(again['segments']) == 1


def refused(main, argv, *words):
    """main(argv) must stop with one line containing all words (argparse's errors exit 2, ours 1)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value.code)
    assert e.value.code not in (0, None) and '\n' not in message and all(w in message for w in words), message
    return message


@pytest.mark.parametrize('main, bad', [(vae_2d, ['--epochs', '0']), (vae_2d, ['--batch-size', '-1']),
                                       (vae_2d, ['--lr', '0']), (vae_2d, ['--lr', 'inf']), (vae_2d, ['--dataset', 'nope']),
                                       (vae_2d, ['--subset', '0']), (vae_2d, ['--seed', str(2**63)]),
                                       (vae_2d, ['--seed', '-1']), (vae_2d, ['--overw']),
                                       (vae_2d, ['--iw-samples', '1000000000']), (vqvae, ['--clip-grad', '-1']),
                                       (vqvae, ['--clip-grad', 'nan']), (vqvae, ['--beta', 'inf']),
                                       (vqvae, ['--restart-below', 'inf']), (vqvae, ['--restart-below', '-1']),
                                       (vqvae, ['--restart-below', 'nan']), (vlae, ['--log-sigma-bound', 'nan']),
                                       (vlae, ['--log-sigma-bound', '1e300']), (vlae, ['--log-sigma-bound', '-1']),
                                       (vae_image, ['--decoder-std', 'inf']), (vae_image, ['--decoder-std', '1e-30']),
                                       (pixelcnn_prior, ['--temperature', 'inf']), (pixelcnn_prior, ['--decoder-std', '0']),
                                       (vae_2d, ['--lr', '1e38']), (vqvae, ['--batch-size', str(2**63)]),
                                       (vae_2d, ['--hidden', str(2**63)]), (vae_image, ['--latent-dim', str(2**63)]),
                                       (vqvae, ['--num-codes', str(2**63)]), (vqvae, ['--code-dim', str(2**63)]),
                                       (vlae, ['--made-hidden', str(2**63)]), (vqvae, ['--beta', '1e300']),
                                       (vqvae, ['--restart-below', '1e38']), (pixelcnn_prior, ['--hidden', str(2**63)])])
def test_bad_options_exit_2(main, bad, capsys):
    with pytest.raises(SystemExit) as e:
        main.main(bad + ['--out', '/nonexistent/never/made'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'error:' in err and 'Traceback' not in err


def test_bad_data_is_refused_and_nothing_is_overwritten(tmp_path):
    d = tmp_path / 'data'
    d.mkdir()
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'metrics.json').write_text('{"keep": 1}')
    run = ['--dataset', 'cifar10', '--data-dir', str(d), '--out', str(out), '--epochs', '1']
    good = np.zeros((4, 32, 32, 3), np.uint8)

    (d / 'cifar10.pkl').write_bytes(pickle.dumps({'train': good, 'test': good})[:-100])  # truncated
    refused(vae_image.main, run, 'cifar10.pkl', 'not a readable')
    (d / 'cifar10.pkl').write_bytes(b'not a pickle at all')
    refused(vae_image.main, run, 'not a readable')
    write_pkl(d / 'cifar10.pkl', good, None)
    refused(vqvae.main, run, "'test' must be a uint8 numpy array")
    with open(d / 'cifar10.pkl', 'wb') as f:
        pickle.dump({'training': good}, f)
    refused(vqvae.main, run, "keys 'train' and 'test'")
    write_pkl(d / 'cifar10.pkl', np.zeros((4, 28, 28, 3), np.uint8), good)
    refused(vae_image.main, run, 'shape (4, 28, 28, 3)')
    write_pkl(d / 'cifar10.pkl', good.astype(np.float32), good)
    refused(vlae.main, run, 'uint8')
    write_pkl(d / 'cifar10.pkl', good, good)
    refused(vae_image.main, run + ['--subset', '5'], '--subset 5', '4 training examples')
    assert (out / 'metrics.json').read_text() == '{"keep": 1}' and not (out / 'model.pt').exists()


def test_missing_data_without_network(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise OSError('network is unreachable')

    def offline_after_mkdir(root, *args, **kwargs):  # torchvision makes its folder, then the download fails
        os.makedirs(root, exist_ok=True)
        offline()

    monkeypatch.setattr(torchvision.datasets, 'SVHN', offline)
    message = refused(vae_image.main, ['--dataset', 'svhn', '--data-dir', str(tmp_path), '--out', str(tmp_path / 'o')],
                      'svhn.pkl', 'network is unreachable')
    assert str(tmp_path) in message
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline_after_mkdir)
    refused(vae_image.main, ['--dataset', 'cifar10', '--data-dir', str(tmp_path / 'new' / 'data'), '--out',
                             str(tmp_path / 'o')], 'network is unreachable')
    refused(vae_image.main, ['--dataset', 'cifar10', '--data-dir', str(tmp_path / 'cifar10.pkl'), '--out',
                             str(tmp_path / 'o')], 'is not a folder', 'holds cifar10.pkl')
    assert sorted(os.listdir(tmp_path)) == ['new']  # no --out left by the failed start, nothing named cifar10.pkl


def test_unwritable_out_is_refused(tmp_path):
    (tmp_path / 'file').write_text('x')
    refused(vae_2d.main, ['--out', str(tmp_path / 'file' / 'sub')], 'cannot write to --out')


def test_wrong_checkpoints_are_refused(image_dir, tmp_path):
    vq = str(tmp_path / 'vq')
    vqvae.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '1', '--batch-size', '32',
                '--num-codes', '8', '--code-dim', '16', '--out', vq])
    vq_ckpt = os.path.join(vq, 'model.pt')
    before = open(vq_ckpt, 'rb').read()
    common_args = ['--data-dir', image_dir, '--epochs', '1']
    # --resume: another codebook size, another script, another dataset
    refused(vqvae.main, ['--dataset', 'cifar10', '--num-codes', '16', '--code-dim', '16', '--out', vq, '--resume']
            + common_args, 'trained with --num-codes 8', 'this run has --num-codes 16')
    for flag in ('--resume', '--overwrite', '--sample-only'):  # a folder of another script's run is never touched
        refused(vae_image.main, ['--dataset', 'cifar10', '--out', vq, flag] + common_args, f'{vq} holds a vqvae.py run',
                'vae_image.py never replaces', 'another --out')
    refused(vqvae.main, ['--dataset', 'mnist', '--num-codes', '8', '--code-dim', '16', '--out', vq, '--resume']
            + common_args, 'trained with --dataset cifar10')
    # the prior: a VQ-VAE of another dataset, a checkpoint of another model, a prior over another codebook
    refused(pixelcnn_prior.main, ['--dataset', 'mnist', '--vqvae', vq_ckpt, '--out', str(tmp_path / 'p')]
            + common_args, 'VQ-VAE of cifar10')
    vae_2d.main(['--epochs', '1', '--subset', '200', '--out', str(tmp_path / 'v2'), '--iw-samples', '2'])
    refused(pixelcnn_prior.main, ['--dataset', 'cifar10', '--vqvae', str(tmp_path / 'v2' / 'model.pt'),
                                  '--out', str(tmp_path / 'p')] + common_args, 'vae_2d.py', 'not vqvae.py')
    prior_out = str(tmp_path / 'prior')
    pixelcnn_prior.main(['--dataset', 'cifar10', '--vqvae', vq_ckpt, '--out', prior_out, '--hidden', '8',
                         '--layers', '2', '--batch-size', '32'] + common_args)
    vqvae.main(['--dataset', 'cifar10', '--data-dir', image_dir, '--epochs', '1', '--batch-size', '32',
                '--num-codes', '4', '--code-dim', '16', '--out', str(tmp_path / 'vq4')])
    refused(pixelcnn_prior.main, ['--dataset', 'cifar10', '--vqvae', str(tmp_path / 'vq4' / 'model.pt'), '--out',
                                  prior_out, '--hidden', '8', '--layers', '2', '--resume'] + common_args,
            f'trained on --vqvae {vq_ckpt} (sha256 ', f'Pass --vqvae {vq_ckpt}')
    refused(pixelcnn_prior.main, ['--dataset', 'cifar10', '--out', prior_out, '--hidden', '8', '--layers', '2',
                                  '--resume'] + common_args, 'this run reads results/vqvae/cifar10/model.pt (no such file)',
            f'Pass --vqvae {vq_ckpt}')
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    refused(pixelcnn_prior.main, ['--dataset', 'cifar10', '--vqvae', str(tmp_path / 'junk.pt'),
                                  '--out', str(tmp_path / 'p')] + common_args, 'is not a VQ-VAE checkpoint of vqvae.py')
    for foreign in ({'model': {}}, torch.zeros(3), [1, 2], {'script': 'vqvae', 'config': {}}):  # loads, but is no VQ-VAE
        torch.save(foreign, tmp_path / 'junk.pt')
        refused(pixelcnn_prior.main, ['--dataset', 'cifar10', '--vqvae', str(tmp_path / 'junk.pt'),
                                      '--out', str(tmp_path / 'p')] + common_args, 'is not a VQ-VAE checkpoint')
    assert open(vq_ckpt, 'rb').read() == before
