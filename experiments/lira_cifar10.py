"""LiRA membership inference on CIFAR-10 with 16, 64 or 256 shadow models (Carlini et al. 2022).

Run:   jaxmem run --config experiments/lira_cifar10.py --data-dir /data/tfds --out runs/lira-c10-64
       jaxmem run --config experiments/lira_cifar10.py --data-dir /data/tfds --num-models 16 --out runs/lira-c10-16
       jaxmem run --config experiments/lira_cifar10.py --data-dir /data/tfds --num-models 256 --out runs/lira-c10-256
       jaxmem report runs/lira-c10-64
Data:  TFDS ``cifar10`` prepared offline in ``--data-dir`` (README, "Datasets from TFDS (offline)").
Cost:  estimated, not measured: ~0.23 GFLOP per training example for this CNN; 64 models x 40 epochs
       x 25,000 examples is ~15 PFLOP, about 10-20 minutes on one H100-class GPU (16 models: a
       quarter of that, 256 models: 4x); impractical on a CPU beyond a smoke test.
Shows: "Membership Inference Attacks From First Principles" (S&P 2022), Fig. 4/Table 1 style: ROC on
       log-log axes and TPR at 0.1% / 1% FPR of the online and offline attacks, and how they improve
       with the number of shadow models (16 -> 64 -> 256). Balanced masks put every example in
       exactly half the models (the paper's design); 2 queries (image and its horizontal flip) as the
       paper's augmented queries. Differences: a small CNN instead of a Wide ResNet, so target
       accuracy and attack success are lower than the paper's.
"""

from jaxmem import RunConfig


def get_config() -> RunConfig:
  return RunConfig(dataset="tfds:cifar10", model="cnn", model_options={"channels": (32, 64, 128)}, augment=True,
                   num_models=64, mask_design="balanced", subset_ratios=(0.5,), queries=2, epochs=40,
                   batch_size=128, optimizer="adam", learning_rate=2e-3, schedule="cosine", weight_decay=5e-4,
                   chunk_size=32)
