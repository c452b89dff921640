"""The default run: Feldman & Zhang's memorization estimator on the embedded digits data.

Run:   jaxmem run --config experiments/digits_default.py --out runs/digits
Cost:  about 70 s on a 2-core CPU (256 models x 30 epochs of a 256-256 MLP), seconds on one GPU.
Shows: which of the 1,347 digits training images need to be in the training set to be classified
       correctly; with ``--label-noise 0.1`` the flipped labels rank at the top (AUROC ~0.99).
"""

from jaxmem import RunConfig


def get_config() -> RunConfig:
  return RunConfig()
