"""An autoregressive prior over a VQ-VAE's codes: PixelCNN and Gated PixelCNN (van den Oord et al., 2016).

The VQ-VAE of vqvae.py turns each 32x32 image into an 8x8 grid of code indices in {0..K-1}. Its decoder
maps any grid back to an image, so a model of p(grid) is a generator of images. The prior factorises
the grid in raster order (row by row, left to right),
    p(c) = prod_i p(c_i | c_1 .. c_{i-1}),
and a convolutional network computes all 64 conditionals in one pass, provided position i's output never
sees positions i, i+1, ...: its convolutions are masked.

    --arch pixelcnn   the course's network: embedding of the K codes into 64 channels, one 7x7 type-A
                      masked convolution (excludes the centre), residual blocks of 3x3 type-B masked
                      convolutions (include the centre), then 1x1 convolutions of 512 and K channels.
                      Stacked masks of this kind leave a blind spot: positions above and to the right
                      that never reach the output, however deep the network.
    --arch gated      Gated PixelCNN: a vertical stack sees the rows above (any column within reach), a
                      horizontal stack sees the current row to the left, and the vertical stack feeds the
                      horizontal one; no blind spot. Each layer is gated: tanh(a) * sigmoid(b).

Loss: cross-entropy, -log p(c_i | c_<i), reported as `nll` in nats per code (mean over the 64 positions
and the batch) and `bits_per_code`.

With the VQ-VAE this also bounds the image likelihood: for the deterministic code z_q(x),
    -log p(x) <= -log p(x | z_q) - log p(z_q)
where p(x | z_q) = N(x_hat(z_q), s^2 I) is the same fixed-variance Gaussian decoder as in vae_image.py
(s = --decoder-std) and p(z_q) is this prior. It is reported as `bits_per_dim` on the 0-255 scale, and
as `bits_per_dim_discrete` with vae_image.py's discretised Gaussian for p(x | z_q): a bound on the
-log2 P(x) / D of 8-bit images that the papers report.

Sampling draws 100 grids position by position (64 network passes), at temperature T (logits / T), and
decodes them with the VQ-VAE.

Run (after vqvae.py for the same dataset):
    python pixelcnn_prior.py --dataset svhn                   # gated, 15 epochs
    python pixelcnn_prior.py --dataset cifar10 --subset 10000 --arch pixelcnn
Writes into results/pixelcnn_prior/<dataset>/<arch>/: samples.png, temperatures.png, curves.png,
metrics.json, model.pt.
"""
import hashlib
import math
import os
import sys
import time

import common
import torch
import torch.nn as nn
import torch.nn.functional as F

import vqvae
import vae_image
from vae_image import bits_per_dim, discrete_log_prob, fit_discrete_scale, gaussian_log_prob  # the image VAE's


def parse_args(argv=None):
    p = common.make_parser(
        __doc__, 'pixelcnn_prior', datasets=list(common.IMAGE_CHANNELS), dataset='svhn', epochs=15,
        batch_size=128, lr=1e-3,
        why={'epochs': "15: the course's budget for the prior.", 'batch_size': "128 grids, the course's batch.",
             'lr': "1e-3, the course's rate for Adam."}, out='<dataset>/<arch>')
    p.add_argument('--vqvae', default=None,
                   help='the VQ-VAE checkpoint (default: results/vqvae/<dataset>/model.pt, what vqvae.py writes)')
    p.add_argument('--arch', choices=['gated', 'pixelcnn'], default='gated',
                   help='gated (default: lower test NLL in our runs, see README) or the plain pixelcnn')
    p.add_argument('--hidden', type=common.positive(int), default=64,
                   help="channels of the embedding and of every masked layer; 64 as in the course")
    p.add_argument('--layers', type=common.positive(int), default=12,
                   help='residual / gated layers; 12 lets the gated stacks reach the whole 8x8 grid')
    p.add_argument('--temperature', type=common.positive(float), default=1.0,
                   help='sampling temperature for samples.png: 1 samples the model itself, < 1 is more conservative')
    p.add_argument('--decoder-std', type=vae_image.DECODER_STD, default=1.0,
                   help="std of the Gaussian decoder in the bits-per-dim bound; 1 matches vae_image.py's default")
    args = p.parse_args(argv)
    if args.out is None:  # one folder per architecture, so the two runs can be compared
        args.out = os.path.join('results', 'pixelcnn_prior', args.dataset, args.arch)
    args.vqvae = args.vqvae or default_vqvae(args.dataset)
    if args.temperature < 1e-6:  # logits / T overflow float32 near 1e-38; from 0.01 on it is already near argmax
        p.error(f'argument --temperature: {args.temperature} is too small to sample with; use 1e-6 or more')
    args.vqvae_sha256 = sha256(args.vqvae) if os.path.isfile(args.vqvae) else None  # --resume checks it
    return args


def default_vqvae(dataset):
    return os.path.join('results', 'vqvae', dataset, 'model.pt')  # where vqvae.py writes by default


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]  # enough to tell two files apart


# ---------------------------------------------------------------------------------------------- masks

class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 mask on every call."""
    def __init__(self, c_in, c_out, mask):
        kh, kw = mask.shape
        super().__init__(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))  # output keeps the input's size
        self.register_buffer('mask', mask.float()[None, None])  # (kh, kw) -> (1, 1, kh, kw)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


def raster_mask(k, include_centre):
    """Rows above the centre, and the centre row left of it (type A) or up to it (type B)."""
    mask = torch.zeros(k, k)
    mask[:k // 2] = 1
    mask[k // 2, :k // 2 + include_centre] = 1
    return mask


def vertical_mask(k, include_centre_row):
    """All columns of the rows above; the centre row too once the input already excludes it."""
    mask = torch.zeros(k, k)
    mask[:k // 2 + include_centre_row] = 1
    return mask


def horizontal_mask(k, include_centre):
    """A 1 x k kernel on the centre row: left of the centre (first layer) or up to it (later layers)."""
    mask = torch.zeros(1, k)
    mask[0, :k // 2 + include_centre] = 1
    return mask


# ---------------------------------------------------------------------------------------------- models

class PixelCNN(nn.Module):
    def __init__(self, num_codes, hidden, layers):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, hidden)
        self.first = MaskedConv2d(hidden, hidden, raster_mask(7, include_centre=False))  # type A
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.ReLU(), MaskedConv2d(hidden, hidden, raster_mask(3, include_centre=True)),  # type B
            nn.ReLU(), nn.Conv2d(hidden, hidden, 1)) for _ in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, 512, 1), nn.ReLU(), nn.Conv2d(512, num_codes, 1))

    def forward(self, codes):
        return self.from_embedding(self.embedding(codes).permute(0, 3, 1, 2))  # (B, H, W, E) -> (B, E, H, W)

    def from_embedding(self, h):
        """(B, E, H, W) -> logits (B, K, H, W); split out so tests can take gradients w.r.t. the input."""
        h = self.first(h)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class GatedLayer(nn.Module):
    """One layer of both stacks (van den Oord et al., 2016, fig. 2), 3x3 kernels."""
    def __init__(self, hidden, is_first):
        super().__init__()
        self.is_first = is_first  # the first layer must not see the centre position; later ones may
        self.v_conv = MaskedConv2d(hidden, 2 * hidden, vertical_mask(3, include_centre_row=not is_first))
        self.h_conv = MaskedConv2d(hidden, 2 * hidden, horizontal_mask(3, include_centre=not is_first))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)  # vertical stack at (i, j) has seen rows < i only
        self.h_out = nn.Conv2d(hidden, hidden, 1)

    @staticmethod
    def gate(x):
        a, b = x.chunk(2, dim=1)  # (B, 2E, H, W) -> 2 x (B, E, H, W)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v, h):
        v_pre = self.v_conv(v)
        h_new = self.h_out(self.gate(self.h_conv(h) + self.v_to_h(v_pre)))
        # No residual in the first layer: h there is the input at (i, j) itself, which must stay unseen.
        return self.gate(v_pre), (h_new if self.is_first else h + h_new)


class GatedPixelCNN(nn.Module):
    def __init__(self, num_codes, hidden, layers):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, hidden)
        self.layers = nn.ModuleList(GatedLayer(hidden, is_first=(i == 0)) for i in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden, 512, 1), nn.ReLU(), nn.Conv2d(512, num_codes, 1))

    def forward(self, codes):
        return self.from_embedding(self.embedding(codes).permute(0, 3, 1, 2))  # (B, H, W, E) -> (B, E, H, W)

    def from_embedding(self, x):
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)


ARCHS = {'pixelcnn': PixelCNN, 'gated': GatedPixelCNN}


# ---------------------------------------------------------------------------------------------- the VQ-VAE's side

def load_vqvae(args, device):
    """Rebuild the VQ-VAE from its checkpoint alone, or stop with one line saying what to run first."""
    if not os.path.isfile(args.vqvae):
        folder, name = os.path.split(args.vqvae)  # vqvae.py writes <--out>/model.pt
        out = [] if args.vqvae == default_vqvae(args.dataset) else ['--out', folder or '.']
        common.fail(f'no VQ-VAE checkpoint at {args.vqvae}; ' + ('train one first: ' + common.shell_command(
            ['python', 'vqvae.py', '--dataset', args.dataset, '--data-dir', args.data_dir] + out)
            if name == 'model.pt' else 'pass the model.pt that vqvae.py wrote'))
    try:
        ckpt = torch.load(args.vqvae, map_location=device, weights_only=True)
        script, cfg, channels = ckpt.get('script'), ckpt['config'], ckpt.get('channels')
        output = cfg.get('output', 'linear')  # a VQ-VAE from before --output had the course's linear one
        model = vqvae.VQVAE(channels, cfg['num_codes'], cfg['code_dim'], output) if script == 'vqvae' else None
        if model is not None and cfg['dataset'] == args.dataset:
            model.to(device).load_state_dict(ckpt['model'])
    except Exception as e:  # unreadable, foreign, or not fitting its own config: all end in one line
        common.fail(f'{args.vqvae} is not a VQ-VAE checkpoint of vqvae.py ({type(e).__name__}: '
                    f'{str(e).splitlines()[0][:120] if str(e) else ""})')
    if script != 'vqvae':
        common.fail(f'{args.vqvae} was written by {f"{script}.py" if isinstance(script, str) else "no script of ours"}'
                    f', not vqvae.py')
    if cfg['dataset'] != args.dataset:
        common.fail(f'{args.vqvae} is a VQ-VAE of {cfg["dataset"]}, not {args.dataset}')
    return model.eval(), cfg


def encode(model, x, decoder_std, batch_size=256):
    """Images -> code grids (N, 8, 8), and -log p(x | z_q) per image under N(x_hat, s^2 I): (N,)."""
    with torch.no_grad():
        codes, recon = [], []
        logvar = torch.full((), 2 * math.log(decoder_std), device=x.device)  # log s^2
        for batch in x.split(batch_size):
            x_hat, _, _, c = model(batch)
            # (B, C, H, W) -> (B, D): one log-density per image, (B,)
            recon.append(-gaussian_log_prob(batch.flatten(1), x_hat.flatten(1), logvar))
            codes.append(c)
        return torch.cat(codes), torch.cat(recon)


# ---------------------------------------------------------------------------------------------- train

def nll_per_grid(prior, codes):
    """-log p(c) = sum_i -log p(c_i | c_<i), per grid: (B,)."""
    logits = prior(codes)  # (B, K, H, W)
    return F.cross_entropy(logits, codes, reduction='none').flatten(1).sum(1)  # (B, H, W) -> (B,)


def loss_terms(prior, codes):
    nll = nll_per_grid(prior, codes) / codes[0].numel()  # nats per code
    return {'nll': nll.mean(), 'bits_per_code': nll.mean() / math.log(2)}


def worst(num_codes):  # what a uniform guess scores: an untrained prior scores about that
    return {'nll': (math.log(num_codes), f'what a uniform guess over {num_codes} codes scores')}


def train_epoch(prior, optimizer, amp, codes, args, progress):
    """One pass over the training grids in the run's precision (common.Amp)."""
    prior.train()
    logs = []
    for batch in common.batches(codes, args.batch_size, shuffle=True, progress=progress):
        with amp.autocast():
            terms = loss_terms(prior, batch)
        amp.step(terms['nll'], optimizer)  # backward and Adam's step (fp16: through a GradScaler)
        logs.append(torch.stack([t.detach().float() for t in terms.values()]))  # stays on the device: no sync
    return dict(zip(terms, torch.stack(logs).T))  # {term: (n_batches,)}


def evaluate(prior, codes, args):
    """Test NLL per code, in fp32 whatever --precision training runs in."""
    with torch.no_grad():
        prior.eval()
        total = 0.0
        for batch in common.batches(codes, args.batch_size, shuffle=False):
            total += nll_per_grid(prior, batch).sum()
        nll = float(total) / codes.numel()
        return {'nll': nll, 'bits_per_code': nll / math.log(2)}


def sample(prior, n, shape, temperature, device):
    """Draw n grids in raster order: one network pass per position (a progress line on a terminal)."""
    with torch.no_grad():
        prior.eval()
        codes = torch.zeros(n, *shape, dtype=torch.long, device=device)
        for i in range(shape[0]):
            for j in range(shape[1]):
                logits = prior(codes)[:, :, i, j] / temperature  # (n, K): only c_<(i,j) has influenced it
                codes[:, i, j] = torch.multinomial(F.softmax(logits, dim=1), 1).squeeze(1)
                done = i * shape[1] + j + 1
                if sys.stdout.isatty():
                    print(f'\rsampling {n} grids at T = {temperature}: position {done}/{codes[0].numel()}',
                          end=common.clear_line() if done == codes[0].numel() else '', flush=True)
        return codes


def main(argv=None):
    args = parse_args(argv)
    fixed = ('arch', 'hidden', 'layers', 'subset')  # the same prior (over the same codes: below); --decoder-std
    # only changes the reported bound, so --sample-only --decoder-std 0.1 re-evaluates a trained prior
    with common.claim_out(args, 'pixelcnn_prior', argv, fixed) as previous:
        was = previous and previous['config'].get('vqvae_sha256')
        if previous and was != args.vqvae_sha256:  # another VQ-VAE: its codes mean other things
            said = '--vqvae ' + common.shell_command([previous['config']['vqvae']])
            common.fail(f'{args.out}/model.pt was trained on {said} (sha256 {was}), and this run reads {args.vqvae} '
                        f'({"sha256 " + args.vqvae_sha256 if args.vqvae_sha256 else "no such file"}). Pass {said}, '
                        f'or use another --out')
        device, precision = common.pick_device(args)
        vq, vq_cfg = load_vqvae(args, device)
        args.num_codes = vq_cfg['num_codes']
        train_x, test_x = common.take_subset(*common.load_images(args.dataset, args.data_dir), args.subset)
        train_codes, _ = encode(vq, train_x.to(device), args.decoder_std)
        test_codes, test_recon = encode(vq, test_x.to(device), args.decoder_std)
        with torch.no_grad():  # the discrete likelihood's scale, fitted on training images (vae_image.py)
            fit = train_x[:500].to(device)
            scale = fit_discrete_scale(fit, vq(fit)[0])
            test_recon_discrete = torch.cat([-discrete_log_prob(b, vq(b)[0], scale) for b in test_x.to(device).split(256)])
        del train_x
        prior = ARCHS[args.arch](args.num_codes, args.hidden, args.layers).to(device)
        optimizer, amp = torch.optim.Adam(prior.parameters(), lr=args.lr), common.Amp(device, precision)
        state = common.restore(previous, args, prior, optimizer, amp)

        for epoch in range(state['epoch'] + 1, args.epochs + 1):
            start = time.time()
            train_logs = train_epoch(prior, optimizer, amp, train_codes, args, (epoch, args.epochs))
            seconds = time.time() - start
            test = evaluate(prior, test_codes, args)
            common.check_finite(train_logs, test, epoch, args, state, worst=worst(args.num_codes))
            common.record(state, train_logs, test, seconds, len(train_codes))
            common.save_checkpoint(prior, optimizer, args, 'pixelcnn_prior', state, amp)
            common.print_epoch(state, args.epochs, test, seconds)

        final = evaluate(prior, test_codes, args)
        # -log p(x) <= -log p(x|z_q) - log p(z_q), averaged over test images, then in bits per dimension.
        dims = test_x[0].numel()
        final['recon_nll'] = float(test_recon.mean())
        final['neg_log_px_bound'] = final['recon_nll'] + final['nll'] * test_codes[0].numel()
        final['bits_per_dim'] = bits_per_dim(final['neg_log_px_bound'], dims)
        # the same bound for 8-bit images: -log P(x) <= -log P(x | z_q) - log p(z_q), P discrete
        final['discrete_scale'] = scale
        final['bits_per_dim_discrete'] = (float(test_recon_discrete.mean()) + final['nll'] * test_codes[0].numel()) / (
            dims * math.log(2))

        title = f'{args.arch} prior on {args.dataset}'
        start = time.time()
        codes = sample(prior, 100, test_codes.shape[1:], args.temperature, device)
        with torch.no_grad():
            images = vq.decoder(vq.lookup(codes))
        if device.type != 'cpu':  # wait for the GPU's queued work: else this times the queueing only
            getattr(torch, device.type).synchronize()
        sample_seconds = time.time() - start
        common.image_grid(f'{args.out}/samples.png', images, 10, f'{title}: 100 samples at T = {args.temperature}')
        rows = []
        for t in (0.5, 0.8, 1.0, 1.2):
            with torch.no_grad():
                rows.append(vq.decoder(vq.lookup(sample(prior, 10, test_codes.shape[1:], t, device))))
        common.image_grid(f'{args.out}/temperatures.png', torch.cat(rows), 10,
                          f'{title}: rows at temperature 0.5, 0.8, 1.0, 1.2')
        print(f'sampling 100 grids took {sample_seconds:.2f}s on {device.type}')
        return common.write_metrics(args, 'pixelcnn_prior', state, final, sample_seconds_100=round(sample_seconds, 3),
                                    sample_device=device.type)


if __name__ == '__main__':
    main()
