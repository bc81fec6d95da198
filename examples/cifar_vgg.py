"""Train a CIFAR-10 VGG (VGG-11 or VGG-16 with batch norm, from robustcompress.models),
optionally with a compressibility penalty and PGD adversarial training.

    python examples/cifar_vgg.py --data ./data --arch vgg16 --out runs/vgg16 --epochs 200
    python examples/cifar_vgg.py --data ./data --penalty group-lasso --strength 1e-4
    torchrun --nproc_per_node 4 examples/cifar_vgg.py --data ./data      # multi-GPU (DDP)

The data folder holds the python version of CIFAR-10 (cifar-10-batches-py/,
unpacked from cifar-10-python.tar.gz); nothing is downloaded.
"""

import robustcompress as rc
from _cifar_common import run

if __name__ == "__main__":
    run(__doc__, {"vgg11": rc.vgg11, "vgg16": rc.vgg16})
