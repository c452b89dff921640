"""CIFAR-100 memorization and influence with a small CNN (Feldman & Zhang 2020's main setting).

Run:   jaxmem run --config experiments/cifar100_memorization.py --data-dir /data/tfds --out runs/cifar100-mem
       jaxmem report runs/cifar100-mem
Data:  TFDS ``cifar100`` prepared offline in ``--data-dir`` (README, "Datasets from TFDS (offline)").
Cost:  estimated, not measured: as ``cifar10_memorization`` (~240 PFLOP for 1,000 models x 30
       epochs): a few GPU-hours on one H100-class GPU; not practical on a CPU.
Shows: Feldman & Zhang's CIFAR-100 results (Fig. 1-4): a heavy tail of memorized examples (with 500
       examples per class, many sub-populations are singletons), and train/test pairs of
       near-duplicates with high influence. Differences: a small CNN instead of ResNet-50, 1,000
       instead of 4,000 models; the small CNN fits CIFAR-100 less well than a ResNet, so expect lower
       own-subset accuracy and therefore lower memorization values than the paper's.
"""

from jaxmem import RunConfig


def get_config() -> RunConfig:
  return RunConfig(dataset="tfds:cifar100", model="cnn", model_options={"channels": (64, 128, 256)}, augment=True,
                   num_models=1000, subset_ratios=(0.7,), epochs=40, batch_size=128, optimizer="adam",
                   learning_rate=2e-3, schedule="cosine", weight_decay=5e-4, chunk_size=25)
