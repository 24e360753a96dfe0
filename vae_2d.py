"""A VAE on 2D points: the smallest model with everything a VAE has (Kingma & Welling, 2014).

Model
    prior      p(z)   = N(0, I),                      z in R^2
    encoder    q(z|x) = N(mu(x), diag sigma^2(x))
    decoder    p(x|z) = N(mu(z), diag sigma^2(z)),    variance learned

Objective: the evidence lower bound, per example, in nats,
    log p(x) >= ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z))
We minimise  -ELBO = recon + kl  with
    recon = -log p(x|z) at one sample z = mu + sigma * eps   (reparameterisation trick)
          = 1/2 sum_d [ log 2 pi + log sigma_d^2(z) + (x_d - mu_d(z))^2 / sigma_d^2(z) ]
    kl    = 1/2 sum_j [ mu_j^2 + sigma_j^2 - 1 - log sigma_j^2 ]   (closed form, both Gaussian)

After training the script also reports an importance-weighted estimate of -log p(x) (Burda et al., 2016),
    log p(x) ~= log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x),
which tightens towards the true value as K grows, and which latent dimensions are in use.

Data: 2D Gaussians. On `gaussian1`/`gaussian2` (rotated, correlated axes) the diagonal decoder cannot
express the correlation alone, so it needs z. On `diagonal1`/`diagonal2` it can: the decoder learns
the data's mean and variance, z is ignored, and the KL falls to zero (posterior collapse).

Run:
    python vae_2d.py                          # gaussian1, 20 epochs, under a minute on a CPU
    python vae_2d.py --dataset diagonal1      # watch the KL go to zero
Writes into results/vae_2d/<dataset>/: samples.png, curves.png, kl_per_dim.png, metrics.json, model.pt.
"""
import math
import time

import common
import torch
import torch.nn as nn

import matplotlib.pyplot as plt  # common.py has chosen the Agg backend

LOG_2PI = math.log(2 * math.pi)


def parse_args(argv=None):
    p = common.make_parser(
        __doc__, 'vae_2d', datasets=list(common.GAUSSIANS_2D), dataset='gaussian1', epochs=20, batch_size=128,
        lr=1e-3, why={'epochs': '20 passes reach within 0.05 nats of the entropy floor on gaussian1.',
                      'batch_size': '128: small enough for many steps per epoch on 10,000 points.',
                      'lr': "1e-3 is Adam's usual step; larger makes the learned decoder variance unstable."},
        precision=False)
    p.add_argument('--hidden', type=common.positive(int), default=128,
                   help='width of the two hidden layers of encoder and decoder; 128 is ample for 2D data')
    p.add_argument('--iw-samples', type=common.positive(int, high=10_000), default=100,
                   help='importance samples K for the final estimate of -log p(x); 100 makes the bound tight here '
                        '(at most 10,000: twice the largest K of Burda et al.)')
    return p.parse_args(argv)


def mlp(n_in, hidden, n_out):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class VAE2d(nn.Module):
    def __init__(self, hidden, x_dim=2, z_dim=2):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = mlp(x_dim, hidden, 2 * z_dim)  # -> mean and log-variance of q(z|x)
        self.decoder = mlp(z_dim, hidden, 2 * x_dim)  # -> mean and log-variance of p(x|z)

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)  # (B, 2 z_dim) -> 2 x (B, z_dim)
        return mu, logvar

    def decode(self, z):
        mu, logvar = self.decoder(z).chunk(2, dim=-1)  # (..., 2 x_dim) -> 2 x (..., x_dim)
        return mu, logvar


def gaussian_log_prob(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)), summed over the last dimension: one number per example.
    The one Gaussian log-density of the project: vae_image.py and vlae.py import it."""
    return -0.5 * (LOG_2PI + logvar + (x - mu) ** 2 / logvar.exp()).sum(-1)


def reparameterise(mu, logvar, samples=None):
    """z = mu + sigma * eps with eps ~ N(0, I): a draw from N(mu, diag exp(logvar)) that gradients flow
    through to mu and sigma (the reparameterisation trick, Kingma & Welling, 2014, sec. 2.4).
    `samples` draws at once: (samples, *mu.shape)."""
    shape = mu.shape if samples is None else (samples, *mu.shape)
    return mu + (0.5 * logvar).exp() * torch.randn(shape, device=mu.device, dtype=mu.dtype)


def kl_standard_normal(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per dimension, in closed form (Kingma & Welling, 2014, appx. B)."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)


def loss_terms(model, x):
    """Negative ELBO of a batch and its two terms, in nats per example (sum over dims, mean over batch)."""
    mu, logvar = model.encode(x)
    z = reparameterise(mu, logvar)
    recon = -gaussian_log_prob(x, *model.decode(z))  # -log p(x|z), Kingma & Welling (2014) eq. 10
    kl = kl_standard_normal(mu, logvar).sum(-1)
    return {'neg_elbo': (recon + kl).mean(), 'recon': recon.mean(), 'kl': kl.mean()}


def train_epoch(model, optimizer, x, batch_size, progress):
    model.train()
    logs = []
    for batch in common.batches(x, batch_size, shuffle=True, progress=progress):
        terms = loss_terms(model, batch)
        optimizer.zero_grad(set_to_none=True)
        terms['neg_elbo'].backward()
        optimizer.step()
        logs.append(torch.stack([t.detach().float() for t in terms.values()]))  # stays on the device: no sync
    return dict(zip(terms, torch.stack(logs).T))  # {term: (n_batches,)}


def evaluate(model, x, batch_size):
    with torch.no_grad():
        model.eval()
        totals = {}
        for batch in common.batches(x, batch_size, shuffle=False):
            for k, v in loss_terms(model, batch).items():
                totals[k] = totals.get(k, 0.0) + v * len(batch)
        return {k: float(v) / len(x) for k, v in totals.items()}


def iw_nll(model, x, k, chunk=100):
    """Importance-weighted estimate of -log p(x) with K samples per example (Burda et al., 2016, eq. 8),
        -log p(x) ~= -log 1/K sum_k w_k,   w_k = p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x).
    The samples go through the decoder `chunk` at a time and log sum_k w_k is accumulated chunk by chunk,
    so memory stays flat for any K (all at once, K = 100,000 on 500 points would need 25.6 GB)."""
    with torch.no_grad():
        mu, logvar = model.encode(x)
        log_sum_w = torch.full((len(x),), -math.inf, device=x.device)
        for first in range(0, k, chunk):
            n = min(chunk, k - first)
            z = reparameterise(mu, logvar, samples=n)  # (n, B, z_dim)
            log_w = (gaussian_log_prob(x, *model.decode(z))                         # log p(x|z_k)
                     + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))  # + log p(z_k)
                     - gaussian_log_prob(z, mu, logvar))                              # - log q(z_k|x)   -> (n, B)
            log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
        return -(log_sum_w - math.log(k))  # (B,)


def latent_usage(model, x):
    """KL per latent dimension (mean over x), and active units: Var_x[mu_j(x)] > 0.01 (Burda et al., 2016)."""
    with torch.no_grad():
        mu, logvar = model.encode(x)
        kl_per_dim = kl_standard_normal(mu, logvar).mean(0)  # (B, z_dim) -> (z_dim,)
        active = int((mu.var(0) > 0.01).sum())
        return kl_per_dim, active


def scatter_2d(path, panels, title):
    """panels: {name: (N, 2) points}, drawn side by side on the same axes."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 3.5), sharex=True, sharey=True)
    for ax, (name, pts) in zip(axes, panels.items()):
        pts = pts.detach().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_aspect('equal')
    fig.suptitle(title, fontsize=10)
    common.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    with common.claim_out(args, 'vae_2d', argv, fixed=('hidden', 'subset')) as previous:  # Ctrl-C: exit 130
        device, _ = common.pick_device(args)  # always fp32: the MLPs are too small to gain
        train_x, test_x = common.take_subset(*common.load_2d(args.dataset), args.subset)
        train_x, test_x = train_x.to(device), test_x.to(device)
        model = VAE2d(args.hidden).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        state = common.restore(previous, args, model, optimizer)

        for epoch in range(state['epoch'] + 1, args.epochs + 1):
            start = time.time()
            train_logs = train_epoch(model, optimizer, train_x, args.batch_size, progress=(epoch, args.epochs))
            seconds = time.time() - start
            test = evaluate(model, test_x, args.batch_size)
            common.check_finite(train_logs, test, epoch, args, state)
            common.record(state, train_logs, test, seconds, len(train_x))
            common.save_checkpoint(model, optimizer, args, 'vae_2d', state)
            common.print_epoch(state, args.epochs, test, seconds)

        model.eval()
        final = evaluate(model, test_x, args.batch_size)
        final['nll_iw'] = float(torch.cat([iw_nll(model, x, args.iw_samples) for x in test_x.split(500)]).mean())
        kl_per_dim, final['active_units'] = latent_usage(model, test_x)
        with torch.no_grad():  # 1,000 samples: z ~ p(z), then x ~ p(x|z) (with noise) or x = mu(z) (without)
            mu, logvar = model.decode(torch.randn(1000, model.z_dim, device=device))
            noisy = reparameterise(mu, logvar)  # x ~ p(x|z): the decoder's noise added to its mean
        scatter_2d(f'{args.out}/samples.png', {'data (test)': test_x[:1000], 'samples, with decoder noise': noisy,
                                               'samples, decoder mean only': mu}, f'vae_2d on {args.dataset}')
        common.bar_chart(f'{args.out}/kl_per_dim.png', kl_per_dim.tolist(), 'latent dimension', 'KL (nats)',
                         f'KL per latent dimension, {args.dataset}')
        return common.write_metrics(args, 'vae_2d', state, final)


if __name__ == '__main__':
    main()
