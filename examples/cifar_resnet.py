"""Train the CIFAR-10 ResNet-18 of robustcompress.models, optionally with a
compressibility penalty and PGD adversarial training.

    python examples/cifar_resnet.py --data ./data --out runs/resnet18 --epochs 200
    python examples/cifar_resnet.py --data ./data --penalty spectral --strength 1e-3 --adv-ratio 0.5
    torchrun --nproc_per_node 4 examples/cifar_resnet.py --data ./data      # multi-GPU (DDP)
    python examples/cifar_resnet.py --data ./data --out runs/resnet18 --resume   # after an interruption

The data folder holds the python version of CIFAR-10 (cifar-10-batches-py/,
unpacked from cifar-10-python.tar.gz); nothing is downloaded.
"""

import robustcompress as rc
from _cifar_common import run

if __name__ == "__main__":
    run(__doc__, {"resnet18": rc.resnet18})
