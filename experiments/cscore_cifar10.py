"""C-score of CIFAR-10 training examples over 9 subset ratios (Jiang et al. 2021).

Run:   jaxmem run --config experiments/cscore_cifar10.py --data-dir /data/tfds --out runs/c10-cscore
       jaxmem report runs/c10-cscore
Data:  TFDS ``cifar10`` prepared offline in ``--data-dir`` (README, "Datasets from TFDS (offline)").
Cost:  estimated, not measured: 9 ratios x 200 models, on average 50% of 50,000 examples x 30 epochs
       of the small CNN, is ~300 PFLOP: several GPU-hours on one H100-class GPU; not practical on a
       CPU beyond a smoke test.
Shows: "Characterizing Structural Regularities of Labeled Data in Overparameterized Models" (ICML
       2021): the C-score (expected held-out accuracy over training-set sizes) and its per-ratio
       components ``cscore_at_0.1`` ... ``cscore_at_0.9``: the report plots their distributions, which
       shift up with the ratio while atypical examples stay low. Differences: a small CNN and 200
       models per ratio (the paper used Inception/ResNet and 2,000+ models per ratio).
"""

from jaxmem import RunConfig


def get_config() -> RunConfig:
  return RunConfig(dataset="tfds:cifar10", model="cnn", model_options={"channels": (32, 64, 128)}, augment=True,
                   num_models=1800, subset_ratios=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), epochs=30,
                   batch_size=128, optimizer="adam", learning_rate=2e-3, schedule="cosine", weight_decay=5e-4,
                   chunk_size=50)
