"""VQ-VAE: an autoencoder whose latent is a grid of discrete codes (van den Oord et al., 2017).

Model
    encoder    z_e(x): (B, C, 32, 32) -> (B, D, 8, 8), one D-vector per grid cell
    quantise   z_q = e_k with k = argmin_j ||z_e - e_j||^2, a codebook of K vectors e_j in R^D
    decoder    x_hat(z_q): (B, D, 8, 8) -> (B, C, 32, 32)
The argmin has no gradient, so the decoder is fed z_e + sg[z_q - z_e]: z_q in the forward pass, and in
the backward pass the decoder's gradient is copied straight through to z_e (straight-through estimator).

Loss (their eq. 3; sg = stop-gradient), each term a mean over its elements, as in the course:
    loss = ||x - x_hat||^2             reconstruction: trains encoder and decoder
         + ||sg[z_e] - e||^2           codebook: moves the chosen codes towards the encoder outputs
         + beta ||z_e - sg[e]||^2      commitment: keeps the encoder near its codes so z_e cannot drift
beta = 0.25, the paper's value (they found results robust for beta in 0.1 to 2.0).

The VQ-VAE has a uniform prior over codes during training, so its loss is not a likelihood; fitting a
prior over the codes afterwards is the job of pixelcnn_prior.py, which reads this script's model.pt.

Also reported on the test set: perplexity = exp(entropy of code usage) (K if all codes were used
equally, 1 if one code did everything), and codes_used, the number of codes chosen at least once.
`--restart-dead-codes` re-initialises, after each epoch, every code unused in that epoch with a random
recent encoder output, a common remedy for codebook collapse.

Run:
    python vqvae.py --dataset svhn                 # 20 epochs; then: python pixelcnn_prior.py --dataset svhn
    python vqvae.py --dataset cifar10 --data-dir ../shared/data
Writes into results/vqvae/<dataset>/: reconstructions.png, code_usage.png, curves.png, metrics.json,
model.pt.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


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
    p.add_argument('--beta', type=common.positive(float), default=0.25,
                   help="commitment weight; 0.25 is the paper's value, robust from 0.1 to 2.0 (van den Oord et "
                        "al., 2017, sec. 3.2)")
    p.add_argument('--restart-dead-codes', action='store_true',
                   help='after each epoch, move codes that no input chose to random recent encoder outputs')
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- model

class ResBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(), nn.Conv2d(dim, dim, 3, 1, 1),
                                 nn.BatchNorm2d(dim), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x):
        return x + self.net(x)


class VQVAE(nn.Module):
    def __init__(self, channels, num_codes, code_dim):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, code_dim, 4, 2, 1), nn.BatchNorm2d(code_dim), nn.ReLU(),  # -> (B, D, 16, 16)
            nn.Conv2d(code_dim, code_dim, 4, 2, 1),                                        # -> (B, D, 8, 8)
            ResBlock(code_dim), ResBlock(code_dim))
        self.decoder = nn.Sequential(
            ResBlock(code_dim), ResBlock(code_dim), nn.BatchNorm2d(code_dim), nn.ReLU(),
            nn.ConvTranspose2d(code_dim, code_dim, 4, 2, 1), nn.BatchNorm2d(code_dim), nn.ReLU(),  # -> 16x16
            nn.ConvTranspose2d(code_dim, channels, 4, 2, 1))                                        # -> 32x32
        self.codebook = nn.Embedding(num_codes, code_dim)
        nn.init.uniform_(self.codebook.weight, -1 / num_codes, 1 / num_codes)  # the course's init

    def nearest_code(self, z_e):
        """(B, D, H, W) -> code indices (B, H, W), by one matrix product:
        ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2."""
        b, d, h, w = z_e.shape
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, d)  # (B, D, H, W) -> (B*H*W, D), fp32 even with --amp
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

def loss_terms(model, x, beta):
    """The VQ-VAE loss and its terms (van den Oord et al., 2017, eq. 3), each a mean over elements."""
    x_hat, z_e, z_q, codes = model(x)
    recon = F.mse_loss(x_hat, x)                  # ||x - x_hat||^2
    codebook = F.mse_loss(z_q, z_e.detach())      # ||sg[z_e] - e||^2: only the codebook learns from it
    commitment = F.mse_loss(z_e, z_q.detach())    # ||z_e - sg[e]||^2: only the encoder learns from it
    terms = {'loss': recon + codebook + beta * commitment, 'recon_mse': recon, 'codebook': codebook,
             'commitment': commitment}
    return terms, codes, z_e


def usage_stats(counts):
    """Perplexity exp(H(p)) of the code-usage distribution p, and the number of codes used."""
    p = counts.float() / counts.sum()
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return {'perplexity': float(entropy.exp()), 'codes_used': int((counts > 0).sum())}


# ---------------------------------------------------------------------------------------------- train

def train_epoch(model, optimizer, x, args, progress, loss_fn=loss_terms):
    model.train()
    logs, counts = [], torch.zeros(args.num_codes, dtype=torch.long, device=x.device)
    for batch in common.batches(x, args.batch_size, shuffle=True, progress=progress):
        with common.autocast(x.device, args.amp):
            terms, codes, z_e = loss_fn(model, batch, args.beta)
        optimizer.zero_grad(set_to_none=True)
        terms['loss'].backward()
        optimizer.step()
        logs.append(torch.stack([t.detach().float() for t in terms.values()]))  # stays on the device: no sync
        counts += torch.bincount(codes.flatten(), minlength=args.num_codes)
    if args.restart_dead_codes:
        restart_dead_codes(model, counts, z_e.detach())
    return dict(zip(terms, torch.stack(logs).T))  # {term: (n_batches,)}


@torch.no_grad()
def restart_dead_codes(model, counts, z_e):
    """Codes that no input chose this epoch get no gradient and would stay dead: move each onto a
    random encoder output from the last batch, where the data is."""
    dead = (counts == 0).nonzero().flatten()
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # (B, D, H, W) -> (B*H*W, D)
    pick = torch.randint(len(flat), (len(dead),), device=flat.device)
    model.codebook.weight[dead] = flat[pick].to(model.codebook.weight.dtype)  # z_e is bfloat16 under --amp
    return len(dead)


@torch.no_grad()
def evaluate(model, x, args):
    """Mean test terms (weighted by batch size), plus perplexity and codes used over the whole set."""
    model.eval()
    totals, counts = {}, torch.zeros(args.num_codes, dtype=torch.long, device=x.device)
    for batch in common.batches(x, args.batch_size, shuffle=False):
        with common.autocast(x.device, args.amp):
            terms, codes, _ = loss_terms(model, batch, args.beta)
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + v.float() * len(batch)
        counts += torch.bincount(codes.flatten(), minlength=args.num_codes)
    return {**{k: float(v) / len(x) for k, v in totals.items()}, **usage_stats(counts)}, counts


def main(argv=None):
    args = parse_args(argv)
    with common.claim_out(args, 'vqvae', argv, fixed=('num_codes', 'code_dim', 'beta', 'subset')) as previous:
        device = common.pick_device(args.device)
        train_x, test_x = common.take_subset(*common.load_images(args.dataset, args.data_dir), args.subset)
        train_x, test_x = train_x.to(device), test_x.to(device)
        model = VQVAE(train_x.shape[1], args.num_codes, args.code_dim).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        state = common.restore(previous, args, model, optimizer)
        train_loss = torch.compile(loss_terms) if args.compile else loss_terms  # same function, fused kernels

        for epoch in range(state['epoch'] + 1, args.epochs + 1):
            start = time.time()
            train_logs = train_epoch(model, optimizer, train_x, args, (epoch, args.epochs), train_loss)
            seconds = time.time() - start
            test = evaluate(model, test_x, args)[0]
            common.check_finite(train_logs, test, epoch, args)
            common.record(state, train_logs, test, seconds, len(train_x))
            common.save_checkpoint(model, optimizer, args, 'vqvae', state, channels=train_x.shape[1])
            common.print_epoch(state, args.epochs, test, seconds)

        final, counts = evaluate(model, test_x, args)
        title = f'vqvae on {args.dataset}'
        with torch.no_grad():
            x = test_x[:50]
            pairs = torch.stack([x, model(x)[0]], dim=1).flatten(0, 1)  # (50, 2, C, H, W) -> (100, C, H, W)
        common.image_grid(f'{args.out}/reconstructions.png', pairs, 10, f'{title}: test images beside reconstructions')
        common.bar_chart(f'{args.out}/code_usage.png', counts.tolist(), 'code index', 'uses on the test set',
                         f'{title}: code usage (perplexity {final["perplexity"]:.1f}, {final["codes_used"]} codes used)')
        return common.write_metrics(args, 'vqvae', state, final)


if __name__ == '__main__':
    main()
