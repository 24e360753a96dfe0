"""Epoch ends after which a VQ-VAE run jumped (issue 30): the next epoch's first batch has a codebook term over
twice the mean of the epoch's last 10 batches, read from the per-batch train history in model.pt.
    python benchmarks/epoch_ends.py results/vqvae/cifar10 [more run folders]
Prints per run: the jumps as (epoch, next first-batch codebook term, the epoch's last-batch recon), the
median last-batch recon at the other ends, and the epochs whose test codebook term is over 0.02."""
import sys, torch, statistics as st
for p in sys.argv[1:]:
    c = torch.load(p + '/model.pt', weights_only=True); h = c['history']['train']; E = c['epoch']; n = len(h['codebook']) // E
    hits = []
    for e in range(1, E):
        before = st.mean(h['codebook'][e * n - 11:e * n - 1]); first = h['codebook'][e * n]
        if first > 2 * before:
            hits.append((e, round(first, 3), round(h['recon_mse'][e * n - 1], 3)))
    t = c['history']['test']['codebook']
    print(p, f'{len(hits)} of {E - 1} ends:', hits, 'last-batch recon at other ends: median',
          round(st.median([h['recon_mse'][e * n - 1] for e in range(1, E) if e not in [x[0] for x in hits]]), 3),
          '| test cb > 0.02 at epochs', [i + 1 for i, v in enumerate(t) if v > 0.02])
