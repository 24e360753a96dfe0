"""What every script would otherwise repeat: data, the command line, checkpoints, plots, metrics.

Nothing here is a model. Each script reads top to bottom on its own; this file only hides bookkeeping:

    load_2d(name)                      the seeded 2D Gaussian datasets of vae_2d.py
    load_images(name, data_dir)        svhn | cifar10 | mnist as float tensors in [-1, 1], (N, C, 32, 32)
    make_parser(...)                   the command-line options every script shares
    Run(args, script)                  device, seed, --out, per-epoch checkpoint, --resume, Ctrl-C, metrics.json
    image_grid / plot_curves / scatter_2d / bar_chart     PNG pictures (Agg backend, no windows)

Bad input ends the program with `fail(...)`: one line on stderr, exit status 1, no traceback.
"""
import argparse
import contextlib
import json
import math
import os
import pickle
import sys
import time

import numpy as np
import torch

import matplotlib
matplotlib.use('Agg')  # files only: works on servers and in CI, never opens a window
import matplotlib.pyplot as plt  # noqa: E402


def fail(message):
    """Stop with one line on stderr and exit status 1 (argparse keeps status 2 for bad options)."""
    raise SystemExit(f'error: {message}')


# ----------------------------------------------------------------------------------------------------
# 2D data: two Gaussians with full covariance (axes rotated by 45 degrees) and their axis-aligned twins.

GAUSSIANS_2D = {  # name: (mean, standard deviations along the two axes, rotated by 45 degrees?)
    'gaussian1': ((1.0, 2.0), (5.0, 1.0), True),
    'gaussian2': ((-1.0, 2.0), (1.0, 5.0), True),
    'diagonal1': ((1.0, 2.0), (5.0, 1.0), False),
    'diagonal2': ((-1.0, 2.0), (1.0, 5.0), False),
}


def load_2d(name, n_train=10_000, n_test=2_500, seed=0):
    """Float tensors (n_train, 2) and (n_test, 2); the fixed seed gives every run the same points."""
    mean, std, rotated = GAUSSIANS_2D[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_train + n_test, 2)) * np.array(std)
    if rotated:
        c = s = math.sqrt(0.5)  # cos 45 = sin 45
        x = x @ np.array([[c, -s], [s, c]]).T
    x = torch.tensor(x + np.array(mean), dtype=torch.float32)
    return x[:n_train], x[n_train:]


# ----------------------------------------------------------------------------------------------------
# Image data: <data-dir>/<name>.pkl in the course data.zip format, else torchvision's download.

IMAGE_CHANNELS = {'svhn': 3, 'cifar10': 3, 'mnist': 1}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers only, so a hostile pickle cannot run code."""
    ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'),
               ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
               ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer')}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'it asks for {module}.{name}, which is not a numpy array')


def _to_float_images(array, name, split, path):
    """uint8 (N, H, W[, C]) -> float32 (N, C, 32, 32) in [-1, 1]; anything else is refused."""
    channels = IMAGE_CHANNELS[name]
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        fail(f"{path}: '{split}' must be a uint8 numpy array, got {getattr(array, 'dtype', type(array).__name__)}")
    if array.ndim == 3 and channels == 1:
        array = array[..., None]  # (N, H, W) -> (N, H, W, 1)
    size = 28 if name == 'mnist' else 32
    if array.ndim != 4 or array.shape[1:] != (size, size, channels) or len(array) == 0:
        fail(f"{path}: '{split}' has shape {array.shape}, expected (N, {size}, {size}, {channels})")
    x = torch.from_numpy(array).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if size == 28:
        x = torch.nn.functional.pad(x, (2, 2, 2, 2))  # MNIST: zero-pad 28x28 -> 32x32
    return x.float() / 127.5 - 1.0


def _read_pickle(path, name):
    try:
        with open(path, 'rb') as f:
            data = _ArraysOnlyUnpickler(f).load()
    except Exception as e:  # truncated, corrupt or hostile: all end the same way, in one line
        fail(f'{path} is not a readable data.zip pickle ({type(e).__name__}: {e})')
    if not isinstance(data, dict) or not {'train', 'test'} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        fail(f"{path} must hold a dict with keys 'train' and 'test', got {keys}")
    return data['train'], data['test']


def _download(name, data_dir):
    """torchvision's copy as uint8 (N, H, W[, C]) arrays; one line on failure (e.g. no network)."""
    import torchvision.datasets as tvd
    try:
        if name == 'svhn':
            splits = [tvd.SVHN(data_dir, split=s, download=True).data.transpose(0, 2, 3, 1)  # (N,C,H,W) -> (N,H,W,C)
                      for s in ('train', 'test')]
        else:
            cls = tvd.CIFAR10 if name == 'cifar10' else tvd.MNIST
            splits = [np.asarray(cls(data_dir, train=t, download=True).data) for t in (True, False)]
    except Exception as e:
        fail(f'no {os.path.join(data_dir, name)}.pkl, and the torchvision download into {data_dir} failed '
             f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}). Put the course data.zip\'s '
             f'{name}.pkl into {data_dir}/ or run once with network access.')
    return splits


def load_images(name, data_dir):
    """(train, test) float tensors in [-1, 1] of shape (N, C, 32, 32), on the CPU."""
    path = os.path.join(data_dir, f'{name}.pkl')
    train, test = _read_pickle(path, name) if os.path.exists(path) else _download(name, data_dir)
    return _to_float_images(train, name, 'train', path), _to_float_images(test, name, 'test', path)


def take_subset(train, test, subset):
    """--subset N: the first N training and the first max(N // 5, 1) test examples."""
    if subset is None:
        return train, test
    if subset > len(train):
        fail(f'--subset {subset} is larger than the {len(train)} training examples')
    return train[:subset], test[:max(subset // 5, 1)]


# ----------------------------------------------------------------------------------------------------
# The command line every script shares.

def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f'must be positive, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def make_parser(doc, script, datasets, dataset, epochs, batch_size, lr, why, amp=True, compile=False,
                out='<dataset>'):
    """The shared options; `why` gives the reason for this script's defaults, shown in --help."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', choices=datasets, default=dataset, help=f'data to model (default: {dataset})')
    p.add_argument('--data-dir', default='./data', help='where <dataset>.pkl lives or torchvision downloads to')
    p.add_argument('--epochs', type=positive(int), default=epochs, help=f'total training epochs. {why["epochs"]}')
    p.add_argument('--batch-size', type=positive(int), default=batch_size, help=why['batch_size'])
    p.add_argument('--lr', type=positive(float), default=lr, help=f'Adam learning rate. {why["lr"]}')
    p.add_argument('--seed', type=int, default=0, help='random seed; the same seed on the CPU repeats a run exactly')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'],
                   help='auto picks cuda, then mps, then cpu')
    p.add_argument('--out', default=None, help=f'output folder (default: results/{script}/{out})')
    p.add_argument('--subset', type=positive(int), default=None,
                   help='train on the first N examples and test on the first max(N // 5, 1): quick runs')
    p.add_argument('--resume', action='store_true', help='continue the run saved in --out up to --epochs in total')
    p.add_argument('--sample-only', action='store_true', help='reload --out/model.pt and redraw pictures, no training')
    if amp:  # convolutions only: the 2D MLPs are too small to gain from it
        p.add_argument('--amp', action='store_true',
                       help='bfloat16 autocast: about 1.8x faster on GPUs and on CPUs with bf16 support; off by '
                            'default because it rounds the numbers (and is slower on CPUs without bf16)')
    if compile:  # offered where it measurably helps (README, section 8)
        p.add_argument('--compile', action='store_true',
                       help='torch.compile the training step: 1.2-1.4x faster after 10-20 s of compiling; off by '
                            'default because it needs a C++ compiler (CPU) or Triton (GPU) and slows the start')
    p.add_argument('--loader', choices=['tensor', 'dataloader'], default='tensor',
                   help='tensor: batches sliced from data kept on the device (fast). dataloader: a DataLoader over '
                        'a numpy array, as the course code does; only for the speed comparison in the README')
    return p


def pick_device(name):
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        return torch.device('mps' if torch.backends.mps.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available() or name == 'mps' and not torch.backends.mps.is_available():
        fail(f'--device {name} is not available on this machine; use --device auto')
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------
# One training run: output folder, checkpoint after every epoch, --resume, Ctrl-C, NaN guard, metrics.json.

class Run:
    def __init__(self, args, script, model_keys=()):
        """model_keys: the config entries a checkpoint must share with this run to be loaded into it."""
        self.args, self.script, self.model_keys = args, script, ('dataset',) + tuple(model_keys)
        args.out = args.out or os.path.join('results', script, args.dataset)
        self.device = pick_device(args.device)
        self.ckpt_path = os.path.join(args.out, 'model.pt')
        try:  # refuse an unwritable --out now, before any work or any file is touched
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, '.write-test'), 'w'):
                pass
            os.remove(os.path.join(args.out, '.write-test'))
        except OSError as e:
            fail(f'cannot write to --out {args.out} ({e.strerror})')
        torch.manual_seed(args.seed)
        self.history = {'train': {}, 'test': {}}
        self.epoch, self.train_seconds, self.train_examples = 0, 0.0, 0
        self.start = time.time()

    # -- checkpoints ---------------------------------------------------------------------------------
    def restore(self, model, optimizer):
        """--resume / --sample-only: load --out/model.pt, written by this script for the same dataset and
        model shape, into model and optimizer, and continue its counters; or fail in one line."""
        path, what = self.ckpt_path, '--sample-only' if self.args.sample_only else '--resume'
        if not os.path.exists(path):
            fail(f'{what}: no checkpoint at {path}; train first with: python {self.script}.py '
                 f'--dataset {self.args.dataset} --out {self.args.out}')
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=True)
            assert isinstance(ckpt, dict) and 'model' in ckpt and 'config' in ckpt
        except Exception as e:
            fail(f'{path} is not a readable checkpoint ({type(e).__name__})')
        if ckpt.get('script') != self.script:
            fail(f'{path} was written by {ckpt.get("script")}.py, not {self.script}.py')
        for key in self.model_keys:
            if ckpt['config'].get(key) != getattr(self.args, key):
                fail(f'{path} has {key}={ckpt["config"].get(key)}, this run asks for {getattr(self.args, key)}')
        try:
            model.load_state_dict(ckpt['model'])
            optimizer.load_state_dict(ckpt['optimizer'])
            for group in optimizer.param_groups:  # a new --lr applies on --resume (e.g. after a NaN)
                group['lr'] = self.args.lr
        except (RuntimeError, ValueError, KeyError) as e:
            fail(f'{self.ckpt_path} does not fit this model ({str(e).splitlines()[0]})')
        self.history, self.epoch = ckpt['history'], ckpt['epoch']
        self.train_seconds, self.train_examples = ckpt['train_seconds'], ckpt['train_examples']
        torch.set_rng_state(ckpt['rng'].cpu())  # the same random stream as a run never interrupted

    def save(self, model, optimizer, **extra):
        """Write model.pt atomically: a crash mid-write leaves the previous checkpoint intact."""
        state = {'model': model.state_dict(), 'config': vars(self.args), 'script': self.script,
                 'optimizer': optimizer.state_dict(), 'epoch': self.epoch, 'history': self.history,
                 'train_seconds': self.train_seconds, 'train_examples': self.train_examples,
                 'rng': torch.get_rng_state(), **extra}
        torch.save(state, self.ckpt_path + '.tmp')
        os.replace(self.ckpt_path + '.tmp', self.ckpt_path)

    # -- the epoch loop ------------------------------------------------------------------------------
    def epochs(self):
        """Epoch numbers still to train (none with --sample-only)."""
        last = self.epoch if self.args.sample_only else self.args.epochs
        return range(self.epoch, last)

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C keeps the checkpoint of the last finished epoch and says how to go on."""
        try:
            yield
        except KeyboardInterrupt:
            command = ' '.join(['python'] + sys.argv + ([] if '--resume' in sys.argv else ['--resume']))
            if not sys.argv[0].endswith(f'{self.script}.py'):  # called as main([...]), e.g. from a test
                command = 'the same command with --resume'
            print(f'\ninterrupted in epoch {self.epoch + 1}; {self.ckpt_path} holds epoch {self.epoch}. '
                  f'Continue with: {command}' if self.epoch else
                  '\ninterrupted in the first epoch; nothing to resume', file=sys.stderr)
            raise SystemExit(130)

    def batches(self, x, batch_size, shuffle):
        """Batches of x for one pass, with a progress counter. x stays on the device and batches are
        sliced by index; --loader dataloader instead feeds a DataLoader over a numpy copy, for comparison."""
        if self.args.loader == 'dataloader':
            chunks = torch.utils.data.DataLoader(x.cpu().numpy(), batch_size=batch_size, shuffle=shuffle)
        else:
            order = torch.randperm(len(x)) if shuffle else torch.arange(len(x))  # CPU RNG: same on every device
            chunks = order.to(x.device).split(batch_size)
        tick = time.time()
        for i, chunk in enumerate(chunks):
            if shuffle and time.time() - tick > 2 and sys.stdout.isatty():
                tick = time.time()
                print(f'\repoch {self.epoch + 1}/{self.args.epochs}  batch {i}/{len(chunks)}', end='', flush=True)
            yield chunk.to(self.device) if self.args.loader == 'dataloader' else x[chunk]

    def autocast(self):
        """bfloat16 autocast with --amp (where the script offers it), else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=getattr(self.args, 'amp', False))

    def end_epoch(self, train_logs, test_terms, seconds, examples, model, optimizer, **extra):
        """train_logs: {term: tensor of per-batch values}; test_terms: {term: float}. One sync per epoch."""
        train = {k: v.float().cpu() for k, v in train_logs.items()}
        bad = ~torch.isfinite(torch.stack(list(train.values()))).all(0)
        if bad.any() or not all(math.isfinite(v) for v in test_terms.values()):
            batch = int(bad.nonzero()[0]) + 1 if bad.any() else 'test'
            fail(f'the loss became NaN or infinite in epoch {self.epoch + 1}, batch {batch}; '
                 f'{self.ckpt_path} keeps the last good epoch ({self.epoch}). Try a smaller --lr.')
        for k, v in train.items():
            self.history['train'].setdefault(k, []).extend(v.tolist())
        for k, v in test_terms.items():
            self.history['test'].setdefault(k, []).append(v)
        self.epoch += 1
        self.train_seconds += seconds
        self.train_examples += examples
        self.save(model, optimizer, **extra)
        shown = '  '.join(f'{k} {v:.4g}' for k, v in list(test_terms.items())[:4])
        print(f'\repoch {self.epoch}/{self.args.epochs}  test {shown}  ({seconds:.1f}s)', flush=True)

    def finish(self, final_test, **extra):
        """Write metrics.json with the final test numbers, the history and the speed."""
        metrics = {'script': self.script, 'dataset': self.args.dataset, 'config': vars(self.args),
                   'epochs_trained': self.epoch, 'final_test': final_test, 'test_history': self.history['test'],
                   'seconds': round(time.time() - self.start, 2),
                   'train_examples_per_s': round(self.train_examples / max(self.train_seconds, 1e-9), 1), **extra}
        with open(os.path.join(self.args.out, 'metrics.json'), 'w') as f:
            json.dump(metrics, f, indent=2)
        plot_curves(os.path.join(self.args.out, 'curves.png'), self.history, self.epoch,
                    f'{self.script} on {self.args.dataset}')
        print('final test: ' + '  '.join(f'{k} {v:.4g}' for k, v in final_test.items()))
        print(f'wrote {self.args.out}/ (metrics.json, model.pt, pictures)')
        return metrics


# ----------------------------------------------------------------------------------------------------
# Pictures.

def image_grid(path, images, nrow, title=None):
    """images: (N, C, H, W) in [-1, 1] -> one PNG, nrow images per row."""
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + 2), nrow * (w + 2))  # 2-pixel white border between images
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, col * (w + 2) + 1: col * (w + 2) + 1 + w] = img
    grid = grid.permute(1, 2, 0).squeeze(-1).numpy()  # (C, H, W) -> (H, W, C), or (H, W) for one channel
    fig = plt.figure(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + (0.4 if title else 0)))
    plt.imshow(grid, cmap='gray' if c == 1 else None, interpolation='nearest')
    plt.axis('off')
    if title:
        plt.title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)


def plot_curves(path, history, epochs, title):
    """One panel per loss term: per-batch train values and per-epoch test values against epochs."""
    keys = list(history['test'])
    if not keys:
        return
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis('off')
    for ax, key in zip(axes.flat, keys):
        train = history['train'].get(key, [])
        if train:
            ax.plot(np.arange(1, len(train) + 1) * epochs / len(train), train, lw=0.5, alpha=0.7, label='train')
        test = history['test'][key]
        ax.plot(np.arange(1, len(test) + 1), test, 'o-', ms=3, label='test')
        values = np.asarray(train + test, dtype=float)
        if values.min() > 0 and values.max() > 30 * values.min():  # early values dwarf the rest
            ax.set_yscale('log')
        ax.set_title(key, fontsize=9)
        ax.set_xlabel('epoch', fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scatter_2d(path, panels, title):
    """panels: {name: (N, 2) points}, drawn side by side on the same axes."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 3.5), sharex=True, sharey=True)
    for ax, (name, pts) in zip(np.atleast_1d(axes), panels.items()):
        pts = pts.detach().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_aspect('equal')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bar_chart(path, values, xlabel, ylabel, title):
    fig = plt.figure(figsize=(max(3.0, 0.25 * len(values)), 2.8))
    plt.bar(np.arange(len(values)), np.asarray(values, dtype=float))
    plt.xlabel(xlabel, fontsize=8)
    plt.ylabel(ylabel, fontsize=8)
    plt.title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
