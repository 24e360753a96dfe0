"""Which batch-norm statistics a trained VQ-VAE's test numbers should use (issue 30): one checkpoint,
evaluated with the running averages it was saved with, with each test batch's own statistics, and with
statistics recomputed over the first N training images (all batch norms, or the decoder's only).
    python benchmarks/bn_probe.py results/vqvae/cifar10/model.pt [data_dir]
Training is not touched: in train mode batch norm uses each batch's statistics, never the running ones."""
import copy
import sys
import types

import torch

sys.path.insert(0, '.')
import common
import vqvae


def recompute(model, x, n, part):
    bns = [m for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()
        for m in bns:
            m.reset_running_stats(); m.momentum = None; m.train()
        for batch in common.batches(x[:n], 128, shuffle=False):
            model(batch)
        for m in bns:
            m.momentum = 0.1
    model.eval()


def main():
    path, data_dir = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else 'data')
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    cfg = ckpt['config']
    args = types.SimpleNamespace(**cfg)
    train_x, test_x = common.take_subset(*common.load_images(cfg['dataset'], data_dir), cfg['subset'])
    base = vqvae.VQVAE(train_x.shape[1], cfg['num_codes'], cfg['code_dim'], cfg['output'])
    base.load_state_dict(ckpt['model'])
    rows = [('running averages (saved)', base)]
    for n in (1024, 2048, len(train_x)):
        for name in ('all', 'decoder'):
            m = copy.deepcopy(base)
            recompute(m, train_x, n, m if name == 'all' else m.decoder)
            rows.append((f'recomputed, {name}, first {n}', m))
    for label, m in rows:
        test, _, seen = vqvae.evaluate(m, test_x, args)
        print(f'{label:34s} recon {test["recon_mse"]:.4f}  eq3 {test["eq3_loss"]:.4f}  codes {test["codes_used"]}  '
              f'ppl {test["perplexity"]:.1f}  speckle {seen["bright_speckle"]:.2f}', flush=True)
    # each test batch's own statistics (what training sees)
    m = copy.deepcopy(base)
    m.train()
    with torch.no_grad():
        tot = {}
        for batch in common.batches(test_x, 128, shuffle=False):
            t = vqvae.loss_terms(m, batch, args.beta)
            for k in ('recon_mse', 'eq3_loss'):
                tot[k] = tot.get(k, 0.0) + float(t[k]) * len(batch)
    print(f'{"test batches own statistics":34s} recon {tot["recon_mse"] / len(test_x):.4f}  eq3 {tot["eq3_loss"] / len(test_x):.4f}')


if __name__ == '__main__':
    main()
