"""What the scripts' mains share: data, options, device, checkpoints, progress, pictures; no model, no training loop."""
import argparse, contextlib, functools, json, math, os, pickle, shlex, shutil, signal, subprocess, sys, time
import filelock
import numpy as np
import torch
import torchvision
import matplotlib
matplotlib.use('Agg')  # files only: works on servers and in CI, never opens a window
import matplotlib.pyplot as plt  # noqa: E402

def fail(message):  # one line on stderr, exit status 1 (argparse keeps 2 for bad options)
    raise SystemExit(f'error: {message}')

GAUSSIANS_2D = {  # name: (mean, standard deviations along the two axes, then rotated by this many degrees)
    'gaussian1': ((1.0, 2.0), (5.0, 1.0), 45), 'gaussian2': ((-1.0, 2.0), (1.0, 5.0), 45),
    'diagonal1': ((1.0, 2.0), (5.0, 1.0), 0), 'diagonal2': ((-1.0, 2.0), (1.0, 5.0), 0)}
IMAGE_CHANNELS = {'svhn': 3, 'cifar10': 3, 'mnist': 1}

def load_2d(name, n_train=10_000, n_test=2_500, seed=0):  # (n_train, 2), (n_test, 2): the same points every run
    mean, std, degrees = GAUSSIANS_2D[name]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    x = np.random.default_rng(seed).standard_normal((n_train + n_test, 2)) * np.array(std)
    x = torch.tensor(x @ np.array([[c, -s], [s, c]]).T + np.array(mean), dtype=torch.float32)
    return x[:n_train], x[n_train:]

class _ArraysOnlyUnpickler(pickle.Unpickler):  # numpy arrays and plain containers: a pickle cannot run code
    def find_class(self, module, name):  # (protocol 2 spells an array's bytes as _codecs.encode: harmless)
        if (module.split('.')[0] == 'numpy' and name in ('ndarray', 'dtype', '_reconstruct', 'scalar', '_frombuffer')
                or (module, name) == ('_codecs', 'encode')):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'it asks for {module}.{name}, which is not a numpy array')

def _from_pickle(path):
    try:
        with open(path, 'rb') as f:
            data = _ArraysOnlyUnpickler(f).load()
    except Exception as e:  # truncated, corrupt or hostile: all end the same way, in one line
        fail(f'{path} is not a readable data.zip pickle ({type(e).__name__}: {e})')
    if not isinstance(data, dict) or not {'train', 'test'} <= set(data):
        fail(f"{path} must hold a dict with keys 'train' and 'test', got "
             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    return data['train'], data['test']

def _from_torchvision(name, data_dir):  # uint8 (N, H, W[, C]) arrays, downloaded once
    try:
        if name == 'svhn':  # torchvision keeps SVHN as (N, C, H, W): -> (N, H, W, C) like the others
            return [torchvision.datasets.SVHN(data_dir, split=s, download=True).data.transpose(0, 2, 3, 1)
                    for s in ('train', 'test')]
        dataset = torchvision.datasets.CIFAR10 if name == 'cifar10' else torchvision.datasets.MNIST
        return [np.asarray(dataset(data_dir, train=t, download=True).data) for t in (True, False)]
    except Exception as e:
        fail(f'no {os.path.join(data_dir, name)}.pkl, and torchvision could not download it ({type(e).__name__}: '
             f'{(str(e).splitlines() or [""])[0]}). Put the course data.zip\'s {name}.pkl there or go online once.')

def load_images(name, data_dir):  # (train, test) (N, C, 32, 32) in [-1, 1], CPU; MNIST zero-padded from 28x28
    if not data_dir or os.path.isfile(data_dir) or data_dir.endswith('.pkl'):  # a file named where its folder goes
        fail(f"--data-dir '{data_dir}' is not a folder; pass the one that holds {name}.pkl: "
             f"--data-dir {os.path.dirname(data_dir) or './data'}")
    path = os.path.join(data_dir, f'{name}.pkl')
    arrays = _from_pickle(path) if os.path.exists(path) else _from_torchvision(name, data_dir)
    channels, size, tensors = IMAGE_CHANNELS[name], 28 if name == 'mnist' else 32, []
    for split, array in zip(('train', 'test'), arrays):
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim == 0:
            got = 'a single number' if np.ndim(array) == 0 else f'{type(array).__name__} {getattr(array, "dtype", "")}'
            fail(f"{path}: '{split}' must be a uint8 numpy array of images, got {got}")
        array = array[..., None] if array.ndim == 3 and channels == 1 else array  # (N, H, W) -> (N, H, W, 1)
        if array.ndim != 4 or array.shape[1:] != (size, size, channels):
            fail(f"{path}: '{split}' has shape {array.shape}, expected (N, {size}, {size}, {channels})")
        if len(array) < (2 if split == 'test' else 1):  # a test variance needs two
            fail(f"{path}: '{split}' holds {len(array)} images, too few")
        x = torch.from_numpy(array).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        tensors.append(torch.nn.functional.pad(x, [(32 - size) // 2] * 4).float() / 127.5 - 1.0)
    return tensors

def take_subset(train, test, subset):  # --subset N: the first N training and N // 5 test examples (2 at least)
    if subset and subset > len(train):
        fail(f'--subset {subset} is larger than the {len(train)} training examples')
    if subset and min(subset // 5, len(test)) < 2:
        fail(f'--subset {subset} leaves {min(subset // 5, len(test))} test examples; use --subset 10 or more')
    return (train[:subset], test[:subset // 5]) if subset else (train, test)

def positive(kind, high=None, low=0, or_zero=False):  # argparse type: above low (or from it), at most high
    def parse(text, high=high or (3.4e38 if kind is float else 2**31 - 1)):  # by default what float32, int32 hold
        if not (math.isfinite(value := kind(text)) and (low <= value <= high if or_zero else low < value <= high)):
            raise argparse.ArgumentTypeError(f'must be {"at least" if or_zero else "above"} {low:g}, at most {high:,}, '
                                             f'got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse

def make_parser(doc, script, datasets, dataset, epochs, batch_size, lr, why, precision=True, compile=False,
                out='<dataset>'):  # the shared options; `why`: the reasons for this script's defaults, for --help
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument('--dataset', choices=datasets, default=dataset, help=f'data to model (default: {dataset})')
    p.add_argument('--data-dir', default='./data', help='folder where <dataset>.pkl lives or torchvision downloads to')
    p.add_argument('--epochs', type=positive(int, high=10**6), default=epochs, help=f'total epochs. {why["epochs"]}')
    p.add_argument('--batch-size', type=positive(int), default=batch_size, help=why['batch_size'])
    p.add_argument('--lr', type=positive(float, high=1), default=lr, help=f'Adam learning rate, at most 1. {why["lr"]}')
    p.add_argument('--seed', type=positive(int, high=2**63 - 1, or_zero=True), default=0,
                   help='random seed; on the CPU the same seed and thread count (OMP_NUM_THREADS) repeat a run exactly')
    p.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'], help='auto: cuda, mps, cpu')
    p.add_argument('--out', default=None, help=f'output folder (default: results/{script}/{out})')
    p.add_argument('--subset', type=positive(int), help='train on the first N examples, test on the first N // 5')
    again = p.add_mutually_exclusive_group()  # for a run in --out (none: refuse); spelled whole, as resume commands
    again.add_argument('--resume', action='store_true', help='continue the run in --out up to --epochs in total')
    again.add_argument('--overwrite', action='store_true', help="start again in an --out that holds this script's "
                       "run; its files go once the new run's first checkpoint is written")
    again.add_argument('--sample-only', action='store_true', help='reload --out/model.pt, recompute the final metrics '
                       '(the prior re-encodes its data) and redraw the pictures: --seed N draws new ones')
    if precision:  # convolutions only: the 2D MLPs are too small to gain from it
        p.add_argument('--precision', choices=['auto', 'fp32', 'bf16', 'fp16'], default='auto', help='of training '
                       '(tests: fp32). auto: bf16 on A100/H100/RTX 30xx, AMX/Zen 4 CPUs; fp16 on T4, V100; else fp32')
    if compile:  # offered where it measurably helps (README, speed)
        p.add_argument('--compile', action='store_true', help='torch.compile the training step: 1.2-1.4x faster after '
                       '10-20 s of compiling; needs a C++ compiler (CPU) or Triton (GPU)')
    return p

@functools.cache  # once a process, 0.2 s
def _bf16_speedup():  # fp32's time over bf16's for a conv layer's forward and backward, best of 3 each
    with torch.random.fork_rng(devices=[]):  # the run's random stream stays as its seed made it
        conv, x, best = torch.nn.Conv2d(256, 256, 3, padding=1), torch.randn(64, 256, 8, 8), {}
        for bf16 in (False, True) * 3:
            start = time.perf_counter()
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                conv(x).float().square().mean().backward()
            best[bf16] = min(best.get(bf16, math.inf), time.perf_counter() - start)
    return best[False] / best[True]

def machine_facts(device, measure=True):  # what precision depends on; ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA lower it
    isa, onednn = torch.backends.cpu.get_cpu_capability(), os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()
    amx = getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)() and ('AMX' in onednn or onednn == 'ALL')
    return {'device': device.type, 'cpu_isa': isa, 'amx': amx, 'bf16_speedup': _bf16_speedup() if device.type == 'cpu'
            and isa.startswith('AVX512') and not amx and measure else None,  # Zen 4: 1.8; Xeon, AVX-512 bf16: 0.9
            'cuda_capability': torch.cuda.get_device_capability(device) if device.type == 'cuda' else None}

def choose_precision(asked, facts):
    """(precision, why) for --precision `asked`. bf16 is fast on GPUs from compute capability 8.0 (older ones emulate
    it), CPUs with AMX (1.7-2.4x fp32) and AVX-512 CPUs where it measures 1.3x or more; fp16 on any CUDA GPU."""
    device, cpu_bf16 = facts['device'], facts['amx'] or (facts.get('bf16_speedup') or 0) >= 1.3
    fast_bf16 = facts['cuda_capability'] >= (8, 0) if device == 'cuda' else \
        device == 'cpu' and cpu_bf16 and facts['cpu_isa'].startswith('AVX512')
    best = 'bf16' if fast_bf16 else 'fp16' if device == 'cuda' else 'fp32'
    slow = asked == 'bf16' and not fast_bf16 and device != 'mps' or asked == 'fp16' and device == 'cpu'
    return (best, 'auto') if asked == 'auto' else (asked, f'asked; likely slower than {best} on this {device}'
                                                   if slow else 'asked')

RAN_ON = {}  # where this run ran, as resolved: metrics.json records it beside the options as given
def pick_device(args):  # the device and precision, said in one line at the start and kept for metrics.json
    available = {'cuda': torch.cuda.is_available(), 'mps': torch.backends.mps.is_available(), 'cpu': True}
    if args.device != 'auto' and not available[args.device]:
        fail(f'--device {args.device} is not available on this machine; use --device auto')
    device = torch.device(args.device if args.device != 'auto' else next(d for d, ok in available.items() if ok))
    facts = machine_facts(device, measure='precision' in args)  # vae_2d is always fp32: nothing to measure
    precision, why = choose_precision(args.precision, facts) if 'precision' in args else ('fp32', 'always here')
    torch.backends.cudnn.benchmark = device.type == 'cuda'  # the fastest convolution for these fixed shapes
    where = (torch.cuda.get_device_name(device) + ', compute capability %d.%d' % facts['cuda_capability']
             if device.type == 'cuda' else f'{facts["cpu_isa"]}, {"" if facts["amx"] else "no "}AMX' +
             (f', bf16 measured {facts["bf16_speedup"]:.1f}x fp32' if facts['bf16_speedup'] else ''))
    RAN_ON.update(device=device.type, precision=precision, threads=torch.get_num_threads(), torch=torch.__version__)
    print(f'running on {device.type} ({where}) in {precision} ({why}), {RAN_ON["threads"]} CPU threads', flush=True)
    return device, precision

class Amp:
    """`with amp.autocast():` forward; amp.step(loss, optimizer, clip): backward, clipping, step. fp16 flushes gradients
    below 6e-8 (most of the VQ-VAE's) to 0: a GradScaler scales the loss up, the gradients back."""
    def __init__(self, device, precision):
        self.device, self.dtype = device, {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')

    def autocast(self):  # fp32: no autocast at all, so nothing depends on the device's autocast support
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def step(self, loss, optimizer, clip=0.0):
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']], clip)
        self.scaler.step(optimizer)
        self.scaler.update()

def _device_rng(device, state=None):  # {device: random stream} of CUDA or MPS ({} on the CPU); sets `state`
    if (module := getattr(torch, device.type) if device.type in ('cuda', 'mps') else None) and state is not None:
        module.set_rng_state(state)
    return {device.type: module.get_rng_state()} if module else {}

_REPLACING = {}  # --out -> the old run's files that --overwrite removes once the new run's first checkpoint is in
_KEYS = {'model', 'optimizer', 'config', 'script', 'epoch', 'rng', 'history', 'train_seconds', 'train_examples',
         'segments'}  # what save_checkpoint writes and restore reads
def _read_checkpoint(path, quiet=False):  # None if there is none; a damaged or foreign file stops (quiet: None)
    if not os.path.exists(path):
        return None
    try:
        ckpt, why = torch.load(path, map_location='cpu', weights_only=True), 'is not a checkpoint of these scripts'
    except Exception as e:
        ckpt, why = None, f'is damaged or not a file ({type(e).__name__})'
    if isinstance(ckpt, dict) and _KEYS <= set(ckpt) and {'epochs', 'seed', 'dataset'} <= set(ckpt['config']):
        return ckpt
    if not quiet:  # never replaced, not even by --overwrite: no run of ours wrote it
        fail(f'{path} {why}; move it away, or use another --out')

def shell_command(words):  # a command line the user's shell runs as it stands: cmd.exe's quoting on Windows
    return subprocess.list2cmdline(words) if os.name == 'nt' else shlex.join(words)

def _interrupted(args, script, argv, path):  # Ctrl-C: exit 130 with one line, the epoch on disk (read back:
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)  # right even mid-write) and the command that goes on
    epoch = None if args.out in _REPLACING else (_read_checkpoint(path, quiet=True) or {}).get('epoch')
    flag = '--resume' if epoch is not None and epoch < args.epochs and not args.sample_only else '--sample-only'
    own = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ('--resume', '--overwrite', '--sample-only')]
    command = shell_command([sys.executable, sys.argv[0] if sys.argv[0].endswith(f'{script}.py') else f'{script}.py']
                            + own + [flag])
    print(('\n' if sys.stdout.isatty() else '') + (f'interrupted; {path} holds epoch {epoch} of {args.epochs}. '
          f'Continue with: {command}' if epoch is not None else f'interrupted before the first epoch ended; {args.out} '
          f'is kept as it was'), file=sys.stderr, flush=True)
    if argv is not None:  # main(argv) called from Python goes on; from the command line, the process ends ignoring
        signal.signal(signal.SIGINT, handler)  # any further Ctrl-C, so it exits 130, not killed by the signal
    raise SystemExit(130)

@contextlib.contextmanager
def claim_out(args, script, argv, fixed=()):
    """Own --out or stop before touching it; yields the checkpoint for --resume / --sample-only (else None). One
    writer at a time: an OS lock on --out/.lock, which the system drops when its process ends, however it ends."""
    args.out = os.path.join('results', script, args.dataset) if args.out is None else args.out
    path, made = os.path.join(args.out, 'model.pt'), not os.path.isdir(args.out)
    lock = filelock.FileLock(os.path.join(args.out, '.lock'), timeout=0)
    try:
        os.makedirs(args.out, exist_ok=True)
        lock.acquire()
    except filelock.Timeout:
        fail(f'{args.out} is being written by another run; wait for it to end, or use another --out')
    except OSError as e:
        folder = '; its .lock is a folder: move it away' if os.path.isdir(os.path.join(args.out, '.lock')) else ''
        fail(f'cannot write to --out {shell_command([args.out])} ({e.strerror}{folder})')
    try:
        previous = _previous_run(args, script, path, fixed)
        if args.overwrite and previous:  # the old run's own files: model.pt, metrics.json, its pictures
            _REPLACING[args.out] = [path] + _files_of_run(args.out, previous)
        _PICTURES.clear()
        torch.manual_seed(args.seed)
        yield None if args.overwrite else previous
    except KeyboardInterrupt:
        _interrupted(args, script, argv, path)
    finally:
        _REPLACING.pop(args.out, None)
        with contextlib.suppress(OSError):  # ours, or a killed writer's: we hold the lock
            os.remove(f'{path}.tmp')
        lock.release()
        if made and os.listdir(args.out) == ['.lock']:  # a failed start: the folder it made goes
            shutil.rmtree(args.out)

def _previous_run(args, script, path, fixed):  # the checkpoint in --out, once this run may use or replace it
    previous, again = _read_checkpoint(path), args.resume or args.sample_only  # argparse allows one of the three
    if previous and previous['script'] != script:
        fail(f'{args.out} holds a {previous["script"]}.py run, which {script}.py never replaces; use another --out')
    if previous and not again and not args.overwrite:
        fail(f'{args.out} already holds a run (epoch {previous["epoch"]} of {previous["config"]["epochs"]}); use '
             f'--resume to continue it, --overwrite to start again, or --out DIR')
    if again and not previous:
        data_dir = [] if args.data_dir == './data' else ['--data-dir', args.data_dir]
        fail(f'{"--resume" if args.resume else "--sample-only"}: no checkpoint at {path}; train first with: '
             + shell_command(['python', f'{script}.py', '--dataset', args.dataset] + data_dir + ['--out', args.out]))
    for key in ('dataset',) + tuple(fixed) if previous and again else ():
        was, now, option = previous['config'].get(key), getattr(args, key), '--' + key.replace('_', '-')
        said = lambda v: f'{option} {shell_command([str(v)])}' if v is not None else f'no {option}'  # noqa: E731
        if was != now:
            fail(f'{path} was trained with {said(was)}, and this run has {said(now)}: a resumed run keeps its model '
                 f'and objective. Pass {said(was)}, or use another --out')
    if args.resume and args.epochs < previous['epoch']:
        fail(f'--resume: {path} has trained {previous["epoch"]} epochs, more than --epochs {args.epochs}; pass '
             f'--epochs {previous["epoch"]} or more, or use --sample-only')
    return previous

def _files_of_run(out, previous):  # metrics.json and the pictures it lists, when it names the checkpoint's run_id
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), open(os.path.join(out, 'metrics.json')) as f:
        if (metrics := json.load(f))['run_id'] == previous['run_id'] and isinstance(metrics['pictures'], list):
            return [os.path.join(out, os.path.basename(p)) for p in ['metrics.json'] + metrics['pictures']
                    if isinstance(p, str) and p.endswith(('.png', '.json'))]
    return []  # no proof that it is this run's: left alone, as any file a run did not write

def restore(previous, args, model, optimizer, amp=None):
    """The run's state, new or from `previous`; a --resume that trains adds a segment (--seed, --lr, --batch-size)."""
    segment = {'from_epoch': 1, 'seed': args.seed, 'lr': args.lr, 'batch_size': args.batch_size}
    if previous is None:  # run_id: what proves that a metrics.json belongs to this checkpoint (--overwrite)
        return {'epoch': 0, 'history': {'train': {}, 'test': {}}, 'train_seconds': 0.0, 'train_examples': 0,
                'segments': [segment], 'run_id': os.urandom(8).hex()}
    try:
        model.load_state_dict(previous['model'])
        optimizer.load_state_dict(previous['optimizer'])
        if amp and previous.get('scaler'):
            amp.scaler.load_state_dict(previous['scaler'])
        if args.seed == previous['config']['seed']:  # the same streams go on; a new seed starts new ones
            torch.set_rng_state(previous['rng'])
            _device_rng(device := next(model.parameters()).device, previous.get('device_rng', {}).get(device.type))
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        fail(f'{args.out}/model.pt does not fit this model ({str(e).splitlines()[0][:200]}); move it away, '
             f'or use another --out')
    for group in optimizer.param_groups:  # a new --lr applies on --resume (e.g. after a NaN)
        group['lr'] = args.lr
    state = {k: previous[k] for k in ('epoch', 'history', 'train_seconds', 'train_examples', 'segments')}
    state['run_id'] = previous.get('run_id') or os.urandom(8).hex()
    if args.sample_only:
        args.epochs = state['epoch']  # no training: the run is as long as what was trained
    elif state['epoch'] < args.epochs:
        state['segments'].append({**segment, 'from_epoch': state['epoch'] + 1})
    return state

def record(state, train_logs, test, seconds, examples):  # one finished epoch: train and test values, time
    for k, v in train_logs.items():
        state['history']['train'].setdefault(k, []).extend(v.tolist())
    for k, v in test.items():
        state['history']['test'].setdefault(k, []).append(v)
    state.update(epoch=state['epoch'] + 1, train_seconds=state['train_seconds'] + seconds,
                 train_examples=state['train_examples'] + examples)

def save_checkpoint(model, optimizer, args, script, state, amp=None, **extra):
    """--out/model.pt, atomically (a temp file, then one rename); after an --overwrite run's first, the old files go."""
    path, tmp = os.path.join(args.out, 'model.pt'), os.path.join(args.out, 'model.pt.tmp')  # one writer: one name
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'config': vars(args),
                'script': script, 'rng': torch.get_rng_state(), 'scaler': amp.scaler.state_dict() if amp else {},
                'device_rng': _device_rng(next(model.parameters()).device), **state, **extra}, tmp)
    for wait in (0.1, 0.5, 2, 0):  # Windows refuses the rename while another program (an indexer, a sync client)
        with contextlib.suppress(PermissionError) if os.name == 'nt' and wait else contextlib.nullcontext():
            os.replace(tmp, path)  # has model.pt open: try again for a few seconds, then let it raise
            break
        time.sleep(wait)
    for old in _REPLACING.pop(args.out, [])[1:]:  # [0] was model.pt, replaced just now
        with contextlib.suppress(OSError):
            os.remove(old)

def check_finite(train_logs, test, epoch, args, state, hint='', worst=None):
    """Stop when the loss became NaN or infinite, exploded (10,000 times the first batch's), or a test number is ten
    times `worst`, {name: (a naive model's score, why)} (tiny runs scored up to 1.5 times it)."""
    values = torch.stack([v.float().cpu() for v in train_logs.values()])  # (terms, batches)
    loss, first = values[0], (state['history']['train'].get(next(iter(train_logs))) or [values[0, 0].item()])[0]
    bad = ~torch.isfinite(values).all(0) | (loss.abs() > 1e4 * max(abs(first), 1.0))  # (batches,)
    above = [f'test {k} {test[k]:.4g} is over ten times {v:.4g}, {why}' for k, (v, why) in (worst or {}).items()
             if test[k] > 10 * v]
    if bad.any() or not all(math.isfinite(v) for v in test.values()) or above:
        where = f'batch {int(bad.nonzero()[0]) + 1}' if bad.any() else above[0] if above else 'the test set'
        kept = ('no checkpoint was written' if epoch == 1 else
                f'{args.out}/model.pt keeps epoch {epoch - 1}, the last good one (continue it with --resume)')
        fail(f'the loss diverged (NaN, infinite, 10,000 times its start, or worse than a naive model) in epoch '
             f'{epoch}, {where}; {kept}. Try a smaller --lr (now {args.lr}){hint}')

def batches(x, batch_size, shuffle, progress=None):  # one pass, in an order drawn on the CPU (the same on any device)
    order = (torch.randperm(len(x)) if shuffle else torch.arange(len(x))).to(x.device).split(batch_size)
    start = tick = time.time()
    for i, chunk in enumerate(order):
        if progress and sys.stdout.isatty() and time.time() - tick > 2:  # (epoch, epochs): speed, time left
            tick, (epoch, epochs), done = time.time(), progress, i * batch_size
            left = (len(x) - done) * (tick - start) / done
            print(f'\repoch {epoch}/{epochs}  batch {i}/{len(order)}  {done / (tick - start):.0f} img/s  epoch left '
                  f'{clock(left)}  run left {clock(left + (epochs - epoch) * len(x) * (tick - start) / done)}  ',
                  end='', flush=True)
        yield x[chunk]

def clear_line():  # on a terminal, spaces wipe the progress line (the legacy Windows console prints ANSI codes)
    return '\r' + ' ' * (shutil.get_terminal_size().columns - 1) + '\r' if sys.stdout.isatty() else ''

def clock(seconds):
    return f'{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}'

def print_epoch(state, epochs, test, seconds):  # one line an epoch (what a log sees), with the time left
    shown = '  '.join(f'{k} {v:.4g}' for k, v in list(test.items())[:4])
    left = f', about {clock(seconds * (epochs - state["epoch"]))} left' if state['epoch'] < epochs else ''
    print(f'{clear_line()}epoch {state["epoch"]}/{epochs}  test {shown}  ({seconds:.1f}s{left})', flush=True)

def write_metrics(args, script, state, final, **extra):
    """metrics.json (final numbers, history, segments, speed, where it ran, pictures) and curves.png."""
    plot_curves(os.path.join(args.out, 'curves.png'), state['history'], state['epoch'], f'{script} on {args.dataset}')
    metrics = {'script': script, 'dataset': args.dataset, 'config': vars(args), 'ran_on': dict(RAN_ON),
               'epochs_trained': state['epoch'], 'final_test': final, 'test_history': state['history']['test'],
               'segments': state['segments'], 'train_seconds': round(state['train_seconds'], 2),
               'train_examples_per_s': round(state['train_examples'] / max(state['train_seconds'], 1e-9), 1),
               'pictures': sorted(set(_PICTURES)), 'run_id': state['run_id'], **extra}
    strict = json.loads(json.dumps(metrics), parse_constant=lambda name: None)  # NaN, Infinity -> null
    with open(os.path.join(args.out, 'metrics.json'), 'w') as f:
        json.dump(strict, f, indent=2, allow_nan=False)
    print('final test: ' + '  '.join(f'{k} {v:.4g}' for k, v in final.items()) + f'\nwrote {args.out}/')
    return metrics

def image_grid(path, images, nrow, title=None):  # (N, C, H, W) in [-1, 1] -> one PNG, nrow a row, white borders
    grid = torchvision.utils.make_grid(images.detach().float().cpu().clamp(-1, 1).add(1).div(2), nrow, pad_value=1)
    fig = plt.figure(figsize=(grid.shape[2] / 40, grid.shape[1] / 40 + (0.4 if title else 0)))
    plt.imshow(grid.permute(1, 2, 0).numpy(), interpolation='nearest')  # (C, H, W) -> (H, W, C)
    plt.axis('off')
    plt.title(title or '', fontsize=9)
    save_figure(fig, path)

def plot_curves(path, history, epochs, title):  # a panel a term: train values a batch, test values an epoch
    keys = list(history['test'])
    cols, rows = min(len(keys), 4), math.ceil(len(keys) / 4)
    fig = plt.figure(figsize=(3.2 * cols, 2.6 * rows))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        train, test = history['train'].get(key, []), history['test'][key]
        ax.plot(np.arange(1, len(train) + 1) * epochs / max(len(train), 1), train, lw=0.5, alpha=0.7, label='train')
        ax.plot(np.arange(1, len(test) + 1), test, 'o-', ms=3, label='test')
        values = np.asarray(train + test, dtype=float)
        if values.min() > 0 and values.max() > 30 * values.min():  # early values dwarf the rest
            ax.set_yscale('log')
        ax.set(title=key, xlabel='epoch')
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)

def bar_chart(path, values, xlabel, ylabel, title):
    fig, ax = plt.subplots(figsize=(min(10.0, max(3.0, 0.25 * len(values))), 2.8))  # 10 in: a README page wide
    ax.bar(np.arange(len(values)), np.asarray(values, dtype=float))
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)

_PICTURES = []  # the pictures this run wrote: metrics.json lists them, so --overwrite removes only those
def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)
    _PICTURES.append(os.path.basename(path))
