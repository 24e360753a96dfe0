"""VQ-VAE: an autoencoder whose latent is a grid of discrete codes (van den Oord et al., 2017).

Model
    encoder    z_e(x): (B, C, 32, 32) -> (B, D, 8, 8), one D-vector per grid cell
    quantise   z_q = e_k with k = argmin_j ||z_e - e_j||^2, a codebook of K vectors e_j in R^D
    decoder    x_hat(z_q): (B, D, 8, 8) -> (B, C, 32, 32)
The argmin has no gradient, so the decoder is fed z_e + sg[z_q - z_e]: z_q in the forward pass, and in
the backward pass the decoder's gradient is copied straight through to z_e (straight-through estimator).

Loss (their eq. 3; sg = stop-gradient), each term a mean over its elements, as in the course:
    eq3_loss = ||x - x_hat||^2             reconstruction: trains encoder and decoder
             + ||sg[z_e] - e||^2           codebook: moves the chosen codes towards the encoder outputs
             + beta ||z_e - sg[e]||^2      commitment: keeps the encoder near its codes so z_e cannot drift
beta = 1 as in the course (the paper's 0.25 leaves the codebook term above the reconstruction error here).
`loss` is what the optimizer minimises: eq3_loss with --codebook loss, eq3_loss without the codebook term
with --codebook ema (the codes then learn by moving averages). Both are reported; eq3_loss is the number
to set beside the course's test loss, whatever the codebook mode.

Two ways to learn the codebook (--codebook), side by side. With n_i encoder outputs z_j assigned to code
i in a batch:
    loss   e_i <- e_i - Adam step of d/de_i ||sg[z_e] - e||^2         (eq. 3 above: the paper's main text)
    ema    N_i <- g N_i + (1 - g) n_i                                  (appendix A.1, decay g = 0.99;
           m_i <- g m_i + (1 - g) sum_{j -> i} z_j                      no codebook term in the loss)
           e_i  = m_i / N~_i,   N~_i = (N_i + eps) / (N + K eps) N,   N = sum_i N_i  (Laplace smoothing)
e_i is the weighted mean of the old code (weight g N_i) and of this batch's inputs (weight (1 - g) n_i):
once N_i is about n_i, each step moves a code 1% of the way to the mean of its inputs, so it is the mean
of its inputs over the last ~100 batches. Why ema is the default: Adam moves each code by about --lr per
step whatever its gradient, while under the course's recipe the encoder's outputs grow tenfold in the
first 54 steps (seed 0: RMS 0.7 -> 8.4; from k-means++ seeds they shrink instead, below). Codes
starting at +-1/K cannot follow; the few that happen to be nearest take every input and the rest die
(15 of 128 used after 2 epochs at beta 0.25). A moving average moves by a share of the distance, so it
follows outputs of any scale; alone it still leaves the codes that nothing chose dead, hence the two
remedies below, all three on by default (what each does alone, over 3 seeds: README, VQ-VAE).

Two more remedies for dead codes, both measured in the README:
    --init kmeans++      the codebook starts as k-means++ seeds (Arthur & Vassilvitskii, 2007) among the
                         encoder outputs of 1,024 training images, instead of uniform in +-1/K (the course's)
    --restart-below N    during training, a code whose moving-average use N_i falls below N encoder outputs
                         per batch moves to an encoder output of the current batch (plus a little noise);
                         its use N_i and sum m_i start again (and, with --codebook loss, its Adam
                         moments). Never on an epoch's last step, so every reported number comes
                         after training steps.
Why --init kmeans++ alone, without EMA codes, is worse than the uniform start (first 40 steps of the
course's recipe with it, measured): the seeds sit where the outputs were at step 0; the outputs move at once
(RMS 0.69 -> 1.70 in two steps, 0.54 by step 40) while Adam moves each code by 0.08 in all, against distances
of 5 to 20. Codes chosen in a batch fall from 120 to 29 by step 3 and 4 by step 40, the seeds nearest the
origin, where the outputs ended. Uniform codes all start at the origin, so more of them stay nearest to
some output.
Every code starts, and every restarted code starts again, with a use N_i of max(2 N, 1): unused, it falls
below N after ln 2 / (1 - g) = 69 steps, so each code has that long to be chosen before it counts as dead.
(A start of 1 would count nearly every code dead after the first step and throw the k-means++ seeds away.)
And --clip-grad 1, the course's: the first steps' gradient norms reach 54; clipped, the reconstruction
is a quarter lower after 2 epochs and a fifth lower after 20 (3 seeds each, README).

The decoder ends in tanh (--output tanh), so no decoded value leaves the pixel range [-1, 1]. The course's
ends in its last transposed convolution (--output linear). Each of its two stride-2 transposed convolutions
makes a pixel from other kernel weights depending on the pixel's position modulo 2, so a flat region decodes
with a period-4 pattern whose amplitude differs by colour channel (Odena et al., 2016). It is largest in
bright regions (skies, white backgrounds), where the linear output overshoots 1: measured, 4 epochs, seed 0,
1.5% of decoded values outside [-1, 1], and a mean error by position modulo 4 that spans 0.18-0.22 per channel
in bright pixels: coloured dots. With tanh, 0.05 (README, VQ-VAE).

Each epoch trains on full batches only: the images left over (16 of 10,000; a different 16 each epoch)
are skipped, since a step with batch norm over so few knocked the encoder off its codes (README, VQ-VAE).

The VQ-VAE has a uniform prior over codes during training, so its loss is not a likelihood; fitting a
prior over the codes afterwards is the job of pixelcnn_prior.py, which reads this script's model.pt.

Test numbers are computed in fp32 whatever --precision training runs in, with batch norm's statistics
recomputed over 1,024 training images first (--bn-images; see recompute_batchnorm). Also reported on
the test set: perplexity = exp(entropy of code usage) (K if all codes were used
equally, 1 if one code did everything), and codes_used, the number of codes chosen at least once. At the
end, outside_range and bright_speckle (see `speckle`): what the eye sees first in a reconstruction.

Run:
    python vqvae.py --dataset svhn                 # 20 epochs; then: python pixelcnn_prior.py --dataset svhn
    python vqvae.py --dataset cifar10 --subset 10000
    python vqvae.py --dataset cifar10 --subset 10000 --codebook loss --init uniform --restart-below 0 \\
        --output linear --bn-images 0 --out results/vqvae/cifar10_course       # the course's recipe
Writes into results/vqvae/<dataset>/: reconstructions.png, code_usage.png, curves.png, metrics.json,
model.pt.
"""
import math
import time

import common
import torch
import torch.nn as nn
import torch.nn.functional as F



def parse_args(argv=None):
    p = common.make_parser(
        __doc__, 'vqvae', datasets=list(common.IMAGE_CHANNELS), dataset='svhn', epochs=20, batch_size=128, lr=1e-3,
        why={'epochs': "20: the course's budget, which its published figures use.",
             'batch_size': "128, the course's batch.",
             'lr': "1e-3, the course's rate for Adam."}, compile=True)
    p.add_argument('--num-codes', type=common.positive(int), default=128,
                   help="codebook size K; 128 as in the course: a PixelCNN over 128 symbols trains quickly")
    p.add_argument('--code-dim', type=common.positive(int), default=256,
                   help="code vector size D, also the network's width; 256 as in the course")
    p.add_argument('--beta', type=common.positive(float), default=1.0,
                   help="commitment weight; 1 as in the course (the paper uses 0.25 and finds 0.1 to 2.0 robust)")
    p.add_argument('--codebook', choices=['ema', 'loss'], default='ema',
                   help="ema: codes are moving averages of their encoder outputs (paper, appendix A.1); loss: "
                        "codes learn by Adam from the codebook term (eq. 3, the course's). ema is the default: "
                        "with the two options below it keeps the codebook in use (README, VQ-VAE)")
    p.add_argument('--ema-decay', type=common.positive(float), default=0.99,
                   help="decay g of the moving averages (codes and usage); 0.99 as in the paper")
    p.add_argument('--init', choices=['kmeans++', 'uniform'], default='kmeans++',
                   help="codebook start: k-means++ seeds among encoder outputs (default), or uniform in +-1/K "
                        "(the course's)")
    p.add_argument('--restart-below', type=common.positive(float, or_zero=True), default=4.0,
                   help="move a code whose moving-average use falls below this many encoder outputs per batch "
                        "(of 8,192 at batch 128; 64 each if all 128 codes were used equally) to a fresh encoder "
                        "output; 0 turns restarts off. 4 is far below even use; every code starts with a use of "
                        "twice this, so it has 69 steps to be chosen before it counts as dead")
    p.add_argument('--output', choices=['tanh', 'linear'], default='tanh',
                   help="the decoder's last step: tanh keeps every decoded value inside the pixel range [-1, 1]; "
                        "linear, the course's, lets bright regions overshoot into coloured dots (README, VQ-VAE)")
    p.add_argument('--bn-images', type=common.positive(int, or_zero=True), default=1024,
                   help="before each evaluation, batch norm's statistics are recomputed over this many training "
                        "images (precise batch norm); 1,024 take 4 s an epoch on two Zen 4 cores (bf16), and all 10,000 moved "
                        "recon by 0.0008. 0 keeps the running averages of the last ~10 batches, the course's, "
                        "with which the test recon jumps between epochs (README, VQ-VAE)")
    p.add_argument('--clip-grad', type=common.positive(float, or_zero=True), default=1.0,
                   help="clip the gradient norm at this value, 0 for none; 1 as in the course: the first steps' "
                        "norms reach 54, and clipping them lowers recon by a quarter after 2 epochs, a fifth after 20 "
                        "(3 seeds each, README, VQ-VAE)")
    args = p.parse_args(argv)
    if not 0 < args.ema_decay < 1:
        p.error(f'argument --ema-decay: must be between 0 and 1, got {args.ema_decay}')
    even = args.batch_size * 64 / args.num_codes  # outputs per code a batch if all codes were used equally
    if args.restart_below > even:
        p.error(f'argument --restart-below: {args.restart_below:g} is above the {even:g} outputs a code gets when all '
                f'{args.num_codes} are used equally at --batch-size {args.batch_size}, so codes would restart forever; '
                f'pass --restart-below {even / 8:g} or a larger --batch-size')
    return args


# ---------------------------------------------------------------------------------------------- model

def flatten_grid(z):
    """One row per grid cell, in fp32 even under autocast (bf16 rounding would pick wrong codes)."""
    return z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B, D, H, W) -> (B*H*W, D), fp32


class ResBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(), nn.Conv2d(dim, dim, 3, 1, 1),
                                 nn.BatchNorm2d(dim), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


class VQVAE(nn.Module):
    def __init__(self, channels, num_codes, code_dim, output='tanh'):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, code_dim, 4, 2, 1), nn.BatchNorm2d(code_dim), nn.ReLU(),  # -> (B, D, 16, 16)
            nn.Conv2d(code_dim, code_dim, 4, 2, 1),                                        # -> (B, D, 8, 8)
            ResBlock(code_dim), ResBlock(code_dim))
        self.decoder = nn.Sequential(
            ResBlock(code_dim), ResBlock(code_dim), nn.BatchNorm2d(code_dim), nn.ReLU(),
            nn.ConvTranspose2d(code_dim, code_dim, 4, 2, 1), nn.BatchNorm2d(code_dim), nn.ReLU(),  # -> 16x16
            nn.ConvTranspose2d(code_dim, channels, 4, 2, 1),                                        # -> 32x32
            nn.Tanh() if output == 'tanh' else nn.Identity())  # tanh: no decoded value outside the pixel range
        self.codebook = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.codebook.weight, -1 / num_codes, 1 / num_codes)  # the course's init
        # Moving averages: N_i, the use of each code (for --codebook ema and for restarts), and m_i, the
        # sum of its encoder outputs (ema only). They start as if each code had been given itself once;
        # a training run sets the start it needs with set_use.
        self.register_buffer('ema_count', torch.ones(num_codes))
        self.register_buffer('ema_sum', self.codebook.weight.detach().clone())

    def nearest_code(self, z_e):
        """(B, D, H, W) -> code indices (B, H, W), by one matrix product:
        ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2."""
        b, _, h, w = z_e.shape
        flat = flatten_grid(z_e)  # (B*H*W, D)
        e = self.codebook.weight  # (K, D)
        with torch.autocast(z_e.device.type, enabled=False):  # bf16 rounding would pick wrong codes
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.T + e.pow(2).sum(1)  # (B*H*W, K)
        return dist.argmin(1).view(b, h, w)  # (B*H*W,) -> (B, H, W)

    def lookup(self, codes):
        """Code indices (B, H, W) -> code vectors (B, D, H, W)."""
        return self.codebook(codes).permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)

    def forward(self, x):
        z_e = self.encoder(x)
        codes = self.nearest_code(z_e)
        z_q = self.lookup(codes)
        x_hat = self.decoder(z_e + (z_q - z_e).detach())  # straight-through: forward z_q, gradient to z_e
        return x_hat, z_e, z_q, codes


# ---------------------------------------------------------------------------------------------- loss

def loss_terms(model, x, beta, codebook_loss=True):
    """The VQ-VAE loss and its terms (van den Oord et al., 2017, eq. 3), each a mean over elements. With
    an EMA codebook (codebook_loss=False) the codebook term is reported but is not part of the loss.
    'loss' is what is minimised, 'eq3_loss' all three terms in either mode. Also in the dict, not losses:
    'codes' and 'z_e', which the codebook's updates need, and 'x_hat', which evaluate measures."""
    x_hat, z_e, z_q, codes = model(x)
    recon = F.mse_loss(x_hat, x)                  # ||x - x_hat||^2
    codebook = F.mse_loss(z_q, z_e.detach())      # ||sg[z_e] - e||^2: only the codebook learns from it
    commitment = F.mse_loss(z_e, z_q.detach())    # ||z_e - sg[e]||^2: only the encoder learns from it
    eq3 = recon + codebook + beta * commitment    # eq. 3 whole: the course's test loss, in both modes
    loss = eq3 if codebook_loss else recon + beta * commitment  # what is minimised
    return {'loss': loss, 'eq3_loss': eq3, 'recon_mse': recon, 'codebook': codebook, 'commitment': commitment,
            'codes': codes, 'z_e': z_e, 'x_hat': x_hat}


def usage_stats(counts):
    """Perplexity exp(H(p)) of the code-usage distribution p, and the number of codes used."""
    p = counts.float() / counts.sum()
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return {'perplexity': float(entropy.exp()), 'codes_used': int((counts > 0).sum())}


def speckle(x, x_hat, bright=0.7):
    """What the eye sees first in a reconstruction, as sums over a batch (finish_speckle divides them):
    'outside_range', the share of decoded values outside the pixel range [-1, 1], which pictures clip; and
    'bright_speckle', the colour speckle in bright regions: over the pixels whose channels are all above
    `bright` in the image (skies, white backgrounds), the mean spread of the reconstruction's channels (their
    standard deviation at a pixel) divided by the image's own. 1 when bright regions are as grey as the
    images; 2 when their colours are twice as far apart, which a reader sees as coloured dots. Colour images
    only (one channel has no spread)."""
    mask = (x > bright).all(1)  # (B, C, H, W) -> (B, H, W): the bright pixels
    spread_hat, spread_x = x_hat.float().std(1, correction=0), x.std(1, correction=0)  # (B, H, W) each
    return {'outside': (x_hat.abs() > 1).sum().float(), 'values': x_hat.numel(), 'bright': mask.sum().float(),
            'spread_hat': spread_hat[mask].sum(), 'spread_x': spread_x[mask].sum()}


def finish_speckle(sums):
    """The two figures of `speckle` from its summed batches; NaN (null in metrics.json) where undefined."""
    ratio = float(sums['spread_hat'] / sums['spread_x']) if sums['bright'] > 0 and sums['spread_x'] > 0 else math.nan
    return {'outside_range': float(sums['outside']) / sums['values'], 'bright_speckle': ratio}


# ---------------------------------------------------------------------------------------------- the codebook

def ema_update(model, z_e, codes, decay, move_codes, eps=1e-5):
    """One step of the moving averages (appendix A.1; see the docstring at the top). The use N_i is kept
    for both kinds of codebook (restarts read it); the codes themselves move only when move_codes."""
    with torch.no_grad():
        flat, k = flatten_grid(z_e), model.ema_count.numel()
        onehot = F.one_hot(codes.flatten(), k).float()  # (B*H*W, K): which code each encoder output chose
        model.ema_count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)  # N_i <- g N_i + (1 - g) n_i
        if move_codes:
            model.ema_sum.mul_(decay).add_(onehot.T @ flat, alpha=1 - decay)  # m_i <- g m_i + (1 - g) sum z_j
            n = model.ema_count.sum()
            smoothed = (model.ema_count + eps) / (n + k * eps) * n  # no division by zero for an unused code
            model.codebook.weight.copy_(model.ema_sum / smoothed[:, None])  # e_i = m_i / N~_i


def fresh_use(threshold):
    """The use N_i a code starts with, at the start and after a restart: twice the restart threshold, so that
    unused it takes ln 2 / (1 - g) = 69 steps to count as dead (1 with restarts off, as if given itself once)."""
    return max(2 * threshold, 1.0)


def set_use(model, use):
    """Every code's use N_i to `use`, its sum m_i to match (so the EMA codebook keeps e_i = m_i / N_i)."""
    with torch.no_grad():
        model.ema_count.fill_(use)
        model.ema_sum.copy_(model.codebook.weight * use)


def kmeans_pp_init(model, z_e):
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): the first code is a random encoder output, each
    next one an output drawn with probability proportional to its squared distance from the codes chosen
    so far. The codebook starts spread over where the encoder's outputs are."""
    with torch.no_grad():
        flat = flatten_grid(z_e)  # (N, D)
        chosen = [int(torch.randint(len(flat), ()))]
        d2 = (flat - flat[chosen[0]]).pow(2).sum(1)  # squared distance to the nearest chosen code
        for _ in range(model.ema_count.numel() - 1):
            chosen.append(int(torch.multinomial(d2 + 1e-12, 1)))  # + 1e-12: all-equal outputs still draw
            d2 = torch.minimum(d2, (flat - flat[chosen[-1]]).pow(2).sum(1))
        model.codebook.weight.copy_(flat[chosen])
        model.ema_sum.copy_(flat[chosen] * model.ema_count[:, None])  # e_i = m_i / N_i still holds


def restart_dead_codes(model, z_e, optimizer, threshold, noise=0.01):
    """Codes whose moving-average use N_i fell below `threshold` are nearest to nothing: they get no
    gradient and no EMA update and would stay dead. Move each to an encoder output of this batch (distinct
    ones while the batch has enough; plus noise, a hundredth of the outputs' spread, so no two codes are
    equal), give it the use a new code starts with (fresh_use: 69 steps to be chosen) and reset its Adam
    moments (--codebook loss): the first to zero, the second to the live codes' average. With the first
    moment at zero and Adam's bias correction long over, its first step is a tenth of the usual size,
    growing to the usual size over about ten steps. Written with masks, not a list of the dead codes: finding
    that list, or returning their number as a Python int, would make the host wait for the GPU every step.
    Returns the number restarted, a tensor."""
    with torch.no_grad():
        dead = model.ema_count < threshold  # (K,)
        flat = flatten_grid(z_e)  # (N, D)
        n, k = len(flat), len(dead)  # a batch may hold fewer outputs than codes: then draw with replacement
        rows = torch.randperm(n, device=flat.device)[:k] if n >= k else torch.randint(n, (k,), device=flat.device)
        picks = flat[rows]  # (K, D): one distinct output per code, taken by the dead ones only
        new = picks + noise * flat.std(correction=0).clamp_min(1e-3) * torch.randn_like(picks)  # apart even if equal
        model.codebook.weight.copy_(torch.where(dead[:, None], new, model.codebook.weight))
        model.ema_count.copy_(torch.where(dead, fresh_use(threshold), model.ema_count))
        model.ema_sum.copy_(torch.where(dead[:, None], new * model.ema_count[:, None], model.ema_sum))
        state = optimizer.state.get(model.codebook.weight, {})
        if 'exp_avg' in state:
            live = (~dead).float()[:, None]  # (K, 1)
            live_mean = (state['exp_avg_sq'] * live).sum(0) / live.sum().clamp_min(1)  # 0 if none is live
            state['exp_avg'].mul_(live)
            state['exp_avg_sq'].copy_(torch.where(dead[:, None], live_mean, state['exp_avg_sq']))
        return dead.sum()


# ---------------------------------------------------------------------------------------------- train

WORST = {'recon_mse': (4.0, 'the error of the worst prediction inside [-1, 1]')}  # no prediction in range is worse


def train_epoch(model, optimizer, amp, x, args, progress, loss_fn=loss_terms):
    """One pass over x in the run's precision (common.Amp), full batches only. After each optimizer step: the
    moving averages, then restarts (never on the epoch's last step). Returns {term: per-batch values}, restarts
    included."""
    model.train()
    logs = []
    # the few images left over are skipped (why: the docstring at the top)
    n_batches = len(x) // args.batch_size or 1  # fewer images than a batch: one step on all of them
    batches = common.batches(x, args.batch_size, shuffle=True, progress=progress)
    for i, batch in zip(range(n_batches), batches):  # range first: zip stops before drawing a short batch
        with amp.autocast():
            terms = loss_fn(model, batch, args.beta, args.codebook == 'loss')
        codes, z_e, _ = terms.pop('codes'), terms.pop('z_e'), terms.pop('x_hat')
        amp.step(terms['loss'], optimizer, args.clip_grad)  # backward, clipping, Adam (fp16: via a GradScaler)
        ema_update(model, z_e.detach(), codes, args.ema_decay, move_codes=args.codebook == 'ema')
        restarted = torch.zeros((), device=x.device)
        if args.restart_below > 0 and i < n_batches - 1:
            restarted = restart_dead_codes(model, z_e.detach(), optimizer, args.restart_below)
        terms['restarts'] = restarted.float()
        logs.append(torch.stack([t.detach().float() for t in terms.values()]))  # stays on the device: no sync
    return dict(zip(terms, torch.stack(logs).T))  # {term: (n_batches,)}


def recompute_batchnorm(model, x, batch_size):
    """Precise batch norm (Wu & Johnson, 2021, "Rethinking 'Batch' in BatchNorm"): set every batch norm's
    running mean and variance to the average over the batches of x of the statistics training mode uses, with
    the weights as they are now. The running averages (momentum 0.1) are mostly the last ~10 batches', taken
    while the weights still moved: evaluated with them, the test recon jumped between epochs while the train
    recon fell (4 epochs, seed 0: 0.054, 0.072, 0.058, 0.023; recomputed: 0.058, 0.035, 0.028, 0.024).
    Training never reads these statistics, so this changes the test numbers (and the model.pt that
    pixelcnn_prior.py encodes with), not the weights. In fp32 and in order (no random numbers), like evaluate."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        model.eval()  # the codebook does not move in a forward pass; only the norms take training mode
        for m in norms:
            m.reset_running_stats()
            m.momentum, m.training = None, True  # momentum None: a plain average over the batches
        for batch in common.batches(x, batch_size, shuffle=False):
            model(batch)
        for m, momentum in zip(norms, momenta):
            m.momentum, m.training = momentum, False  # as they were, for the next epoch's training


def evaluate(model, x, args):
    """Mean test terms (weighted by batch size), plus perplexity and codes used over the whole set, in eval
    mode (batch norm's stored statistics, recomputed before each evaluation unless --bn-images 0: an image's
    codes do not depend on its batch). Also returns the code counts and the two figures of `speckle`
    (reported once, at the end: NaN for grey images)."""
    with torch.no_grad():
        model.eval()
        totals, counts = {}, torch.zeros(args.num_codes, dtype=torch.long, device=x.device)
        seen = {}  # speckle's sums
        for batch in common.batches(x, args.batch_size, shuffle=False):  # fp32 whatever --precision: reported
            terms = loss_terms(model, batch, args.beta, args.codebook == 'loss')
            codes, _, x_hat = terms.pop('codes'), terms.pop('z_e'), terms.pop('x_hat')
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.float() * len(batch)
            for k, v in speckle(batch, x_hat).items():
                seen[k] = seen.get(k, 0.0) + v
            counts += F.one_hot(codes.flatten(), args.num_codes).sum(0)  # not bincount: unreliable on MPS
        test = {**{k: float(v) / len(x) for k, v in totals.items()}, **usage_stats(counts)}
        return test, counts, finish_speckle(seen)


def main(argv=None):
    args = parse_args(argv)
    fixed = ('num_codes', 'code_dim', 'beta', 'codebook', 'output', 'subset')  # what defines the model, its objective
    with common.claim_out(args, 'vqvae', argv, fixed) as previous:
        device, precision = common.pick_device(args)
        train_x, test_x = common.take_subset(*common.load_images(args.dataset, args.data_dir), args.subset)
        train_x, test_x = train_x.to(device), test_x.to(device)
        model = VQVAE(train_x.shape[1], args.num_codes, args.code_dim, args.output).to(device)
        if args.codebook == 'ema':
            model.codebook.weight.requires_grad_(False)  # moved by ema_update, not by the optimizer
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        amp = common.Amp(device, precision)
        state = common.restore(previous, args, model, optimizer, amp)
        if previous is None:  # a new codebook: every code with the use of a new code, then the seeds
            set_use(model, fresh_use(args.restart_below))
            if args.init == 'kmeans++':
                with torch.no_grad(), amp.autocast():
                    kmeans_pp_init(model, model.encoder(train_x[torch.randperm(len(train_x))[:1024]]))
        train_loss = torch.compile(loss_terms) if args.compile else loss_terms  # same function, fused kernels

        for epoch in range(state['epoch'] + 1, args.epochs + 1):
            start = time.time()
            train_logs = train_epoch(model, optimizer, amp, train_x, args, (epoch, args.epochs), train_loss)
            seconds = time.time() - start
            if args.bn_images:
                recompute_batchnorm(model, train_x[:args.bn_images], args.batch_size)
            test = evaluate(model, test_x, args)[0]
            common.check_finite(train_logs, test, epoch, args, state, worst=WORST)
            common.record(state, train_logs, test, seconds, len(train_x))
            common.save_checkpoint(model, optimizer, args, 'vqvae', state, amp, channels=train_x.shape[1])
            common.print_epoch(state, args.epochs, test, seconds)

        final, counts, seen = evaluate(model, test_x, args)
        final.update(seen)
        title = f'vqvae on {args.dataset}'
        with torch.no_grad():
            x = test_x[:50]
            pairs = torch.stack([x, model(x)[0]], dim=1).flatten(0, 1)  # (50, 2, C, H, W) -> (100, C, H, W)
        common.image_grid(f'{args.out}/reconstructions.png', pairs, 10, f'{title}: test images beside reconstructions')
        common.bar_chart(f'{args.out}/code_usage.png', counts.tolist(), 'code index', 'uses on the test set',
                         f'{title}: code usage (perplexity {final["perplexity"]:.1f}, '
                         f'{final["codes_used"]} codes used)')
        return common.write_metrics(args, 'vqvae', state, final)


if __name__ == '__main__':
    main()
