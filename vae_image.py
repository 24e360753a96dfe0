"""A VAE on 32x32 images with a convolutional encoder and decoder (Kingma & Welling, 2014).

Model
    prior      p(z)   = N(0, I),                  z in R^16
    encoder    q(z|x) = N(mu(x), diag sigma^2(x))
    decoder    p(x|z) = N(mu(z), s^2 I),          s = --decoder-std, fixed
The course describes its decoder as N(mu(z), I), s = 1, our default; its loss, sum of squared errors + KL, is
the negative ELBO at s^2 = 1/2 up to a constant, so --decoder-std 0.7071 trains the course's objective.

Objective: the negative ELBO, in nats per image with all constants, on pixels scaled to [-1, 1]:
    -ELBO = recon + kl
    recon = -log p(x|z) = 1/2 sum_d [ log(2 pi s^2) + (x_d - mu_d(z))^2 / s^2 ],  z = mu + sigma * eps
    kl    = KL(q(z|x) || N(0, I)) = 1/2 sum_j [ mu_j^2 + sigma_j^2 - 1 - log sigma_j^2 ]

What s changes. s is how much pixel noise the model believes in. The reconstruction error is divided by
s^2 while the KL is not, so s sets the exchange rate between them: s = 1 makes
a pixel error cheap, the encoder keeps little information in z (small KL) and the images are blurry;
s = 0.1 makes errors 100 times dearer, so the encoder puts more into z (the KL grows) to sharpen the
reconstructions, as far as the network can. It also changes the likelihood itself: a density of std s
costs 1/2 log(2 pi s^2) per pixel even for a perfect mean, which at s = 1 (half the width of [-1, 1]) is
8.32 bits on the 0-255 scale, worse than a uniform guess (8 bits) whatever the network does; an s
narrower than the decoder's real errors is penalised too. The README has measured numbers for s = 1 and s = 0.1.

Also reported, per test image:
    mse           per-pixel squared error of the decoder mean, on [-1, 1]
    bits_per_dim  -ELBO on the 0-255 pixel scale / (D ln 2) = (-ELBO + D ln 127.5) / (D ln 2). A density at
                  the integer pixel values, not a discrete likelihood. On MNIST D counts the 32x32 frame,
                  240 of whose 1,024 pixels are padding, so it is not comparable with 28x28 figures
    sse_plus_kl   sum of squared errors + KL: the course's convention (SVHN 104.0, CIFAR-10 241.6 after 20
                  epochs); it equals 2 (-ELBO) - D log 2 pi at s = 1, up to the factor on the KL
    nll_iw        importance-weighted estimate of -log p(x) with K samples (Burda et al., 2016)
    bits_per_dim_discrete, bits_per_dim_iw_discrete
                  the ELBO and that estimate for 8-bit pixels: p(x|z) a Gaussian discretised to the 256
                  levels (discrete_log_prob), its scale fitted on training images after training; the
                  papers' bits/dim, a bound on -log2 P(x) / D
    active_units  latent dimensions whose posterior mean varies over the test set (variance > 0.01)

Run:
    python vae_image.py --dataset svhn                       # 20 epochs; downloads SVHN unless ./data/svhn.pkl
    python vae_image.py --dataset cifar10 --subset 10000 --epochs 5
Writes into results/vae_image/<dataset>/: samples.png, reconstructions.png, interpolations.png,
traversals.png, kl_per_dim.png, curves.png, metrics.json, model.pt.
"""
import math
import time

import common
import torch
import torch.nn as nn

from vae_2d import gaussian_log_prob, kl_standard_normal, reparameterise  # the same math as the 2D VAE

NAN_HINT = ', or a larger --decoder-std (a small s makes every pixel error 1/s^2 times dearer)'
# s from 1e-4, a 78th of one of the 255 steps between pixel levels: far smaller s overflow float32's sums
DECODER_STD = common.positive(float, low=1e-4, or_zero=True)


def make_parser(script='vae_image', doc=__doc__):
    """The options of this script; vlae.py adds its prior's to them."""
    p = common.make_parser(
        doc, script, datasets=list(common.IMAGE_CHANNELS), dataset='svhn', epochs=20, batch_size=128, lr=1e-3,
        why={'epochs': "20: the course's budget, which its published figures use.",
             'batch_size': "128, the course's batch: fits any laptop's memory.",
             'lr': "1e-3: the course's rate, and Adam's usual step."}, compile=True)
    p.add_argument('--latent-dim', type=common.positive(int), default=16,
                   help="size of z; 16 as in the course: enough for coarse image structure, small enough to look at")
    p.add_argument('--decoder-std', type=DECODER_STD, default=1.0,
                   help="fixed std s of p(x|z) on [-1, 1] pixels; 1: the course's stated N(mu, I) (its loss is that of "
                        "s = 0.7071). Smaller s trades KL for "
                        "sharper reconstructions (see the docstring)")
    p.add_argument('--iw-samples', type=common.positive(int, high=10_000), default=100,
                   help='importance samples K for the final estimate of -log p(x); 100 as in Burda et al. (at most '
                        '10,000: twice their largest K)')
    p.add_argument('--iw-examples', type=common.positive(int), default=500,
                   help='test images used for that estimate: K decodes each, so a subset keeps it quick on a CPU')
    return p


# ---------------------------------------------------------------------------------------------- model

class Encoder(nn.Module):
    def __init__(self, channels, z_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 1, 1), nn.ReLU(),      # (B, C, 32, 32) -> (B, 32, 32, 32)
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),            # -> (B, 64, 16, 16)
            nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),           # -> (B, 128, 8, 8)
            nn.Conv2d(128, 256, 3, 2, 1), nn.ReLU(),          # -> (B, 256, 4, 4)
            nn.Flatten(), nn.Linear(4 * 4 * 256, 2 * z_dim))  # (B, 4096) -> (B, 2 z_dim)

    def forward(self, x):
        mu, logvar = self.net(x).float().chunk(2, dim=1)  # (B, 2 z_dim) -> 2 x (B, z_dim); fp32 under autocast
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, channels, z_dim):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(z_dim, 4 * 4 * 128), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(128, 128, 4, 2, 1), nn.ReLU(),  # (B, 128, 4, 4) -> (B, 128, 8, 8)
            nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.ReLU(),   # -> (B, 64, 16, 16)
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),    # -> (B, 32, 32, 32)
            nn.Conv2d(32, channels, 3, 1, 1))                  # -> (B, C, 32, 32): the mean of p(x|z)

    def forward(self, z):
        h = self.fc(z).view(-1, 128, 4, 4)  # (B, 2048) -> (B, 128, 4, 4)
        return self.net(h)


class StandardNormal(nn.Module):
    """The prior p(z) = N(0, I). vlae.py swaps in a learned prior with the same two methods."""
    def __init__(self, z_dim):
        super().__init__()
        self.z_dim = z_dim

    def log_prob(self, z):
        return gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))  # (..., z_dim) -> (...)

    def sample(self, n, device):
        return torch.randn(n, self.z_dim, device=device)


class VAE(nn.Module):
    def __init__(self, channels, z_dim, decoder_std, prior=None):
        super().__init__()
        self.encoder, self.decoder = Encoder(channels, z_dim), Decoder(channels, z_dim)
        self.prior = prior if prior is not None else StandardNormal(z_dim)
        self.decoder_std = decoder_std


# ---------------------------------------------------------------------------------------------- loss

def reconstruction(model, x, z):
    """-log p(x|z) = -log N(x; decoder(z), s^2 I) summed over pixels, and the per-pixel squared error: (B,) each."""
    x, mean = x.flatten(1), model.decoder(z).flatten(1)  # (B, C, H, W) -> (B, D)
    logvar = torch.full((), 2 * math.log(model.decoder_std), device=x.device)  # log s^2, fixed; filled there: no sync
    return -gaussian_log_prob(x, mean, logvar), ((x - mean) ** 2).mean(1)


def bits_per_dim(nats, dims):
    """Nats per image on [-1, 1] pixels -> bits per dimension on the 0-255 scale. Stretching [-1, 1] to
    [0, 255] divides a density by 127.5 per dimension, which adds D ln 127.5 nats; then / (D ln 2)."""
    return (nats + dims * math.log(127.5)) / (dims * math.log(2))


def discrete_log_prob(x, mean, scale):
    """log P(x) of 8-bit images under a Gaussian of std `scale` around `mean`, discretised to the 256 levels
    (Salimans et al., 2017, do this with a logistic), summed over dimensions: (B, ...) -> (B,). On [-1, 1] the
    levels sit 2/255 apart: level x gets the Gaussian's mass within 1/255 of it, the two end levels also the
    tails. The masses sum to one over a pixel's 256 levels, so P(x|z), and P(x) = E_p(z) P(x|z), are
    distributions over 8-bit images and an ELBO computed with it bounds -log P(x) (Jensen): the papers'
    bits/dim. A density at the levels bounds nothing of the kind (it can exceed 1). Computed on the CPU in
    float64 (masses far in a tail; MPS has neither float64 nor log_ndtr); returned in float32 on x's device
    (each image's sum is then within 0.001 nats)."""
    device = x.device
    x, mean = x.flatten(1).cpu().double(), mean.flatten(1).cpu().double()  # (B, D) on the CPU, float64
    half = 1 / 255
    lo = torch.where(x < -1 + half, -math.inf, (x - half - mean) / scale)  # the bin's edges, standardised
    hi = torch.where(x > 1 - half, math.inf, (x + half - mean) / scale)
    flip = lo + hi > 0  # a bin right of the mean: read the same mass in the left tail, where it is accurate
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi = torch.special.log_ndtr(hi)  # log (Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - Phi(lo) / Phi(hi))
    log_p = (log_hi + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - log_hi))).sum(1)  # (B,)
    return log_p.float().to(device)


def fit_discrete_scale(x, x_hat):
    """The one scale that makes training images x likeliest under discrete_log_prob around x_hat, on a grid
    from 1e-3 (a tenth of a level) to 1: a coarse pass, then a fine one. Fitted on training data, the test
    number it gives stays a bound. For models trained with a fixed s, which need not suit discrete pixels."""
    x, x_hat = x.cpu().double(), x_hat.cpu().double()  # once, not at each of the 38 scales tried

    def likeliest(grid):
        nll = torch.stack([-discrete_log_prob(x, x_hat, s).mean() for s in grid])
        return float(grid[int(nll.argmin())])
    coarse = likeliest(torch.logspace(-3, 0, 13).double())  # 1e-3 .. 1, steps of a factor 1.78
    return likeliest(coarse * (10 ** 0.02) ** torch.arange(-12, 13).double())  # +-12 steps of 4.7% around it


def loss_terms(model, x):
    """Negative ELBO and its terms, nats per image (sum over dims, mean over batch)."""
    mu, logvar = model.encoder(x)
    z = reparameterise(mu, logvar)
    recon, mse = reconstruction(model, x, z)  # Kingma & Welling (2014), eq. 10, one sample
    kl = kl_standard_normal(mu, logvar).sum(1)
    return {'neg_elbo': (recon + kl).mean(), 'recon': recon.mean(), 'kl': kl.mean(), 'mse': mse.mean()}


def with_course_metrics(terms, dims):
    """Add bits per dimension (0-255 scale) and the course's sum of squared errors + KL."""
    terms['bits_per_dim'] = bits_per_dim(terms['neg_elbo'], dims)
    terms['sse_plus_kl'] = terms['mse'] * dims + terms['kl']
    return terms


# ---------------------------------------------------------------------------------------------- train

def worst(s, dims):
    """The recon term of the worst decoder mean inside [-1, 1] (every pixel off by 2): no model scores more."""
    return {'recon': (dims / 2 * math.log(2 * math.pi * s ** 2) + dims * 4 / (2 * s ** 2),
                      'the worst decoder mean inside [-1, 1] scores')}


def train_epoch(model, optimizer, amp, x, args, progress, loss_fn=loss_terms):
    """One pass over x in the run's precision (common.Amp); vlae.py passes its own loss. Returns {term:
    per-batch values}."""
    model.train()
    logs = []
    for batch in common.batches(x, args.batch_size, shuffle=True, progress=progress):
        with amp.autocast():
            terms = loss_fn(model, batch)
        amp.step(terms['neg_elbo'], optimizer)  # backward and Adam's step (fp16: through a GradScaler)
        logs.append(torch.stack([t.detach().float() for t in terms.values()]))  # stays on the device: no sync
    return dict(zip(terms, torch.stack(logs).T))  # {term: (n_batches,)}


def evaluate(model, x, args, loss_fn=loss_terms):
    """Mean test terms, nats per image, in fp32 whatever --precision trains in: reported numbers are not rounded."""
    with torch.no_grad():
        model.eval()
        totals = {}
        for batch in common.batches(x, args.batch_size, shuffle=False):
            terms = loss_fn(model, batch)
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.float() * len(batch)
        return with_course_metrics({k: float(v) / len(x) for k, v in totals.items()}, x[0].numel())


def iw_nll(model, x, k, discrete_scale=None):
    """-log p(x) ~= -log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al., 2016, eq. 8).
    With discrete_scale, p(x|z) is discrete_log_prob's, and the estimate is of -log P(x) for 8-bit x.
    K = 1 is the ELBO with a one-sample KL."""
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        log_w = []
        for _ in range(k):  # one decode of the whole batch per sample keeps memory flat
            z = reparameterise(mu, logvar)
            recon = (reconstruction(model, x, z)[0] if discrete_scale is None else
                     -discrete_log_prob(x, model.decoder(z), discrete_scale))
            log_w.append(-recon + model.prior.log_prob(z) - gaussian_log_prob(z, mu, logvar))  # (B,)
        return -(torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k))  # (K, B) -> (B,)


def active_units(mu):
    """A dimension is active when its posterior mean varies over the data: Var_x[mu_j(x)] > 0.01."""
    return int((mu.var(0) > 0.01).sum())


def final_metrics(model, train_x, test_x, args, loss_fn=loss_terms):
    """Test metrics, the importance-weighted -log p(x) on a subset, active units, and both in bits/dim of the
    discrete likelihood (its scale fitted on up to 500 training images)."""
    with torch.no_grad():
        model.eval()
        final = evaluate(model, test_x, args, loss_fn)
        sub = test_x[:args.iw_examples]
        dims = test_x[0].numel()
        final['nll_iw'] = float(torch.cat([iw_nll(model, b, args.iw_samples) for b in sub.split(100)]).mean())
        final['bits_per_dim_iw'] = bits_per_dim(final['nll_iw'], dims)
        final['neg_elbo_iw_subset'] = evaluate(model, sub, args, loss_fn)['neg_elbo']
        fit = train_x[:500]
        final['discrete_scale'] = scale = fit_discrete_scale(fit, model.decoder(reparameterise(*model.encoder(fit))))
        for key, x, k in (('bits_per_dim_discrete', test_x, 1), ('bits_per_dim_iw_discrete', sub, args.iw_samples)):
            nats = torch.cat([iw_nll(model, b, k, scale) for b in x.split(100)]).mean()  # K = 1: the ELBO
            final[key] = float(nats) / (dims * math.log(2))
        final['active_units'] = active_units(torch.cat([model.encoder(b)[0] for b in test_x.split(500)]))
        return final


def draw_pictures(model, test_x, out, title):
    """Samples, reconstructions, interpolations and latent traversals, each one PNG."""
    with torch.no_grad():
        model.eval()
        device = test_x.device
        common.image_grid(f'{out}/samples.png', model.decoder(model.prior.sample(100, device)), 10,
                          f'{title}: 100 samples (decoder means)')
        x = test_x[:50]
        recon = model.decoder(model.encoder(x)[0])
        pairs = torch.stack([x, recon], dim=1).flatten(0, 1)  # (50, 2, C, H, W) -> (100, C, H, W): image, recon
        common.image_grid(f'{out}/reconstructions.png', pairs, 10, f'{title}: test images beside reconstructions')
        mu = model.encoder(test_x[:20])[0]
        za, zb = mu[:10], mu.flip(0)[:10]  # pairs (0, 19), (1, 18), ...: still works on a tiny test set
        t = torch.linspace(0, 1, 10, device=device).view(1, 10, 1)  # (10,) -> (1, 10 steps, 1)
        z = za[:, None] * (1 - t) + zb[:, None] * t  # (pairs, 10 steps, z_dim)
        common.image_grid(f'{out}/interpolations.png', model.decoder(z.flatten(0, 1)), 10,  # -> (pairs*10, z_dim)
                          f'{title}: interpolations between test images')
        # Traversals: two test images, one row per latent dimension, that dimension moved over mu +- 3.
        mu = model.encoder(test_x[:2])[0]  # (2, z_dim)
        z_dim, steps = mu.shape[1], torch.linspace(-3, 3, 9, device=device)
        z = mu[None, :, None].repeat(z_dim, 1, 9, 1)  # (z_dim rows, 2 images, 9 steps, z_dim)
        for j in range(z_dim):
            z[j, :, :, j] += steps
        common.image_grid(f'{out}/traversals.png', model.decoder(z.flatten(0, 2)), 18,  # -> (z_dim*2*9, z_dim)
                          f'{title}: each row moves one latent dimension over mu +- 3 (two test images)')


def kl_per_dim(model, x):
    """KL(q(z|x) || N(0, I)) per example and latent dimension, in closed form: (B, z_dim)."""
    return kl_standard_normal(*model.encoder(x))


def main(argv=None):
    args = make_parser().parse_args(argv)
    with common.claim_out(args, 'vae_image', argv, fixed=('latent_dim', 'decoder_std', 'subset')) as previous:
        device, precision = common.pick_device(args)
        train_x, test_x = common.take_subset(*common.load_images(args.dataset, args.data_dir), args.subset)
        train_x, test_x = train_x.to(device), test_x.to(device)
        model = VAE(train_x.shape[1], args.latent_dim, args.decoder_std).to(device)
        optimizer, amp = torch.optim.Adam(model.parameters(), lr=args.lr), common.Amp(device, precision)
        state = common.restore(previous, args, model, optimizer, amp)
        train_loss = torch.compile(loss_terms) if args.compile else loss_terms  # same function, fused kernels

        for epoch in range(state['epoch'] + 1, args.epochs + 1):
            start = time.time()
            train_logs = train_epoch(model, optimizer, amp, train_x, args, (epoch, args.epochs), train_loss)
            seconds = time.time() - start
            test = evaluate(model, test_x, args)
            common.check_finite(train_logs, test, epoch, args, state, NAN_HINT,
                                worst(args.decoder_std, test_x[0].numel()))
            common.record(state, train_logs, test, seconds, len(train_x))
            common.save_checkpoint(model, optimizer, args, 'vae_image', state, amp)
            common.print_epoch(state, args.epochs, test, seconds)

        final = final_metrics(model, train_x, test_x, args)
        title = f'vae_image on {args.dataset}'
        with torch.no_grad():
            kl = torch.cat([kl_per_dim(model, b) for b in test_x.split(500)]).mean(0)  # (N, z_dim) -> (z_dim,)
        common.bar_chart(f'{args.out}/kl_per_dim.png', kl.tolist(), 'latent dimension', 'KL (nats)',
                         f'{title}: KL per latent dimension')
        draw_pictures(model, test_x, args.out, title)
        return common.write_metrics(args, 'vae_image', state, final)


if __name__ == '__main__':
    main()
