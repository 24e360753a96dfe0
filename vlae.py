"""The course's "VLAE": the image VAE of vae_image.py with a MADE autoregressive-flow prior.

Chen et al. (2017) name VLAE a VAE with both an autoregressive-flow prior and an autoregressive (PixelCNN)
decoder; this script has only the first, with vae_image.py's Gaussian decoder, as the course does.

A N(0, I) prior forces every posterior towards one fixed shape; the KL term pays for each mismatch. A
learned prior can move towards the aggregate posterior instead: for a fixed encoder and decoder the
ELBO is then tighter (trained jointly, the -ELBO need not fall: README, section 3). Everything but the
prior and the loss's KL is imported from vae_image.py.

Prior: an autoregressive flow over the 16 latent dimensions,
    eps = z * sigma(z) + mu(z),      eps ~ N(0, I),
where the i-th entries of mu and sigma depend only on z_1..z_{i-1} (a MADE network: Germain et al.,
2015, two masked hidden layers of --made-hidden = 512 units; log sigma free, or b tanh(. / b) with
--log-sigma-bound b). The Jacobian d eps / d z is then lower-triangular with diagonal sigma, so by the
change of variables
    log p(z) = log N(eps; 0, I) + sum_i log sigma_i(z)
and each term is a conditional:  log p(z_i | z_<i) = log N(eps_i; 0, 1) + log sigma_i.

Objective: the negative ELBO, with the KL estimated at the posterior sample z ~ q(z|x) (no closed form):
    -ELBO = -log p(x|z) + [log q(z|x) - log p(z)]
The `kl` this script logs is that one-sample estimate (unbiased, noisier than vae_image.py's closed form),
and `kl_per_dim.png` splits it by the chain rule into log q(z_i|x) - log p(z_i|z_<i): those terms depend
on the flow's order and can be negative, so they are not comparable with the N(0, I) prior's per-dimension
KLs, nor is `active_units` (the 0.01 threshold assumes a prior of unit scale).
Sampling inverts the flow one dimension at a time: z_i = (eps_i - mu_i(z_<i)) / sigma_i(z_<i).

Metrics, pictures and options are those of vae_image.py, plus `kl_if_standard_prior`: the closed-form KL
that N(0, I) would charge for the same posteriors. The gap to `kl` is what the learned prior saves.

Run:
    python vlae.py --dataset svhn
    python vlae.py --dataset cifar10 --subset 10000 --epochs 5
Writes into results/vlae/<dataset>/ the same files as vae_image.py.
"""
import time

import common
import torch
import torch.nn as nn
import torch.nn.functional as F

import vae_image
from vae_image import VAE, gaussian_log_prob, reconstruction, reparameterise


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask on every call."""
    def __init__(self, n_in, n_out, mask):
        super().__init__(n_in, n_out)
        self.register_buffer('mask', mask.float())  # (n_out, n_in)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """z (B, D) -> mu, log_sigma (B, D) each, entry i a function of z_1..z_{i-1} only (Germain et al., 2015).

    Every unit gets a degree: input i has degree i, a hidden unit one in 1..D-1. A hidden unit sees units
    of degree <= its own; output i sees units of degree < i. So no path links z_j to output i when j >= i.
    """
    def __init__(self, d, hidden=512, log_sigma_bound=0.0):
        super().__init__()
        self.log_sigma_bound = log_sigma_bound
        deg_in = torch.arange(1, d + 1)
        deg_h = torch.arange(hidden) % max(d - 1, 1) + 1  # cycle through 1..D-1: every degree well used
        deg_out = deg_in.repeat(2)  # mu and log_sigma for each dimension
        self.net = nn.Sequential(
            MaskedLinear(d, hidden, deg_h[:, None] >= deg_in[None, :]), nn.ReLU(),
            MaskedLinear(hidden, hidden, deg_h[:, None] >= deg_h[None, :]), nn.ReLU(),
            MaskedLinear(hidden, 2 * d, deg_out[:, None] > deg_h[None, :]))
        nn.init.zeros_(self.net[-1].weight)  # start as the identity flow, i.e. the N(0, I) prior
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z):
        mu, log_sigma = self.net(z).float().chunk(2, dim=1)  # (B, 2D) -> 2 x (B, D); fp32: fp16 exp overflows > 11.09
        if self.log_sigma_bound:  # b tanh(u / b): the same near 0, never beyond +-b
            log_sigma = self.log_sigma_bound * torch.tanh(log_sigma / self.log_sigma_bound)
        return mu, log_sigma


class FlowPrior(nn.Module):
    """p(z) through eps = z * sigma(z) + mu(z); same methods as vae_image.StandardNormal."""
    def __init__(self, z_dim, hidden=512, log_sigma_bound=0.0):
        super().__init__()
        self.z_dim, self.made = z_dim, MADE(z_dim, hidden, log_sigma_bound)

    def forward(self, z):
        """z -> eps and log |d eps / d z| per dimension (the Jacobian's diagonal)."""
        mu, log_sigma = self.made(z)
        return z * log_sigma.exp() + mu, log_sigma

    def conditionals(self, z):
        """log p(z_i | z_<i) = log N(eps_i; 0, 1) + log sigma_i, one per dimension: (B, D)."""
        eps, log_sigma = self(z)
        zero = torch.zeros_like(eps)
        return gaussian_log_prob(eps[..., None], zero[..., None], zero[..., None]) + log_sigma  # sum over 1 dim

    def log_prob(self, z):
        return self.conditionals(z).sum(-1)  # (B, D) -> (B,): the chain rule

    def sample(self, n, device, eps=None):
        """Invert the flow one dimension at a time: D passes of the MADE."""
        with torch.no_grad():
            eps = torch.randn(n, self.z_dim, device=device) if eps is None else eps
            z = torch.zeros_like(eps)
            for i in range(self.z_dim):
                mu, log_sigma = self.made(z)  # entry i is final once z_1..z_{i-1} are
                z[:, i] = (eps[:, i] - mu[:, i]) * torch.exp(-log_sigma[:, i])
            return z


def loss_terms(model, x):
    """Negative ELBO with a single-sample KL estimate, nats per image (sum over dims, mean over batch)."""
    mu, logvar = model.encoder(x)
    z = reparameterise(mu, logvar)
    recon, mse = reconstruction(model, x, z)
    kl = gaussian_log_prob(z, mu, logvar) - model.prior.log_prob(z)  # log q(z|x) - log p(z), one sample
    return {'neg_elbo': (recon + kl).mean(), 'recon': recon.mean(), 'kl': kl.mean(), 'mse': mse.mean()}


def kl_per_dim(model, x, samples=10):
    """E_q[log q(z_i|x) - log p(z_i|z_<i)] per example and dimension, by Monte Carlo: (B, z_dim).
    They add up to the KL, but unlike the N(0, I) prior's they are not each a KL: a term depends on the
    dimensions before it in the flow's order and can be negative."""
    mu, logvar = model.encoder(x)
    z = reparameterise(mu, logvar, samples)  # (S, B, z_dim)
    log_p = model.prior.conditionals(z.flatten(0, 1)).view_as(z)  # (S*B, z_dim) -> (S, B, z_dim)
    log_q = gaussian_log_prob(z[..., None], mu[..., None], logvar[..., None])  # per dimension: sum over 1
    return (log_q - log_p).mean(0)


def main(argv=None):
    p = vae_image.make_parser('vlae', __doc__)
    p.add_argument('--made-hidden', type=common.positive(int), default=512,
                   help="width of the MADE's two hidden layers; 512 as in the course (128 charged more KL: 68.2 +- 2.6 "
                        "against 61.4 +- 2.4, s = 0.1, 5 epochs, seeds 0-2)")
    p.add_argument('--log-sigma-bound', type=common.positive(float, high=20, or_zero=True), default=0.0,
                   help="bound b on the flow's log sigma, through b tanh(. / b); 0 leaves it free: b = 1, the "
                        "course's, made no measurable difference (KL 61.9 +- 2.6 against 61.4 +- 2.4 free, s = 0.1, "
                        "5 epochs, seeds 0-2). At most 20: sigma up to e^20")
    args = p.parse_args(argv)
    fixed = ('latent_dim', 'decoder_std', 'subset', 'made_hidden', 'log_sigma_bound')
    with common.claim_out(args, 'vlae', argv, fixed=fixed) as previous:
        device, precision = common.pick_device(args)
        train_x, test_x = common.take_subset(*common.load_images(args.dataset, args.data_dir), args.subset)
        train_x, test_x = train_x.to(device), test_x.to(device)
        prior = FlowPrior(args.latent_dim, args.made_hidden, args.log_sigma_bound)
        model = VAE(train_x.shape[1], args.latent_dim, args.decoder_std, prior=prior).to(device)
        optimizer, amp = torch.optim.Adam(model.parameters(), lr=args.lr), common.Amp(device, precision)
        state = common.restore(previous, args, model, optimizer, amp)
        train_loss = torch.compile(loss_terms) if args.compile else loss_terms  # same function, fused kernels

        for epoch in range(state['epoch'] + 1, args.epochs + 1):  # the loop of vae_image.py, with this loss
            start = time.time()
            train_logs = vae_image.train_epoch(model, optimizer, amp, train_x, args, (epoch, args.epochs), train_loss)
            seconds = time.time() - start
            test = vae_image.evaluate(model, test_x, args, loss_terms)
            common.check_finite(train_logs, test, epoch, args, state, vae_image.NAN_HINT,
                                vae_image.worst(args.decoder_std, test_x[0].numel()))
            common.record(state, train_logs, test, seconds, len(train_x))
            common.save_checkpoint(model, optimizer, args, 'vlae', state, amp)
            common.print_epoch(state, args.epochs, test, seconds)

        final = vae_image.final_metrics(model, train_x, test_x, args, loss_terms)
        title = f'vlae on {args.dataset}'
        with torch.no_grad():  # what N(0, I) would charge for the same posteriors: the learned prior's saving
            final['kl_if_standard_prior'] = float(torch.cat(
                [vae_image.kl_per_dim(model, b).sum(1) for b in test_x.split(500)]).mean())
            kl = torch.cat([kl_per_dim(model, b) for b in test_x.split(500)]).mean(0)  # (N, z_dim) -> (z_dim,)
        common.bar_chart(f'{args.out}/kl_per_dim.png', kl.tolist(), 'latent dimension', 'nats',
                         f'{title}: E[log q(z_i|x) - log p(z_i|z_<i)] (10 samples; they sum to the KL)')
        vae_image.draw_pictures(model, test_x, args.out, title)
        return common.write_metrics(args, 'vlae', state, final)


if __name__ == '__main__':
    main()
