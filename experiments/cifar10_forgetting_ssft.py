"""Forgetting events, first-learned epoch and EL2N/GraNd on CIFAR-10, then SSFT's two-phase study.

Run:   jaxmem run --config experiments/cifar10_forgetting_ssft.py --data-dir /data/tfds --out runs/c10-dynamics
       jaxmem study ssft --config experiments/cifar10_forgetting_ssft.py --data-dir /data/tfds --num-models 8 --run runs/c10-dynamics
       jaxmem report runs/c10-dynamics
Data:  TFDS ``cifar10`` prepared offline in ``--data-dir`` (README, "Datasets from TFDS (offline)").
Cost:  estimated, not measured: 64 models x 30 epochs x 35,000 examples of the small CNN is ~15
       PFLOP plus a per-epoch evaluation of all 50,000 training examples (~+30%): about 15-30
       minutes on one H100-class GPU; the SSFT study (2 orders x 8 models x 2 phases) about as much
       again. Not practical on a CPU beyond a smoke test.
Shows: Toneva et al. 2019 (forgetting events; unforgettable vs forgettable examples), Paul et al.
       2021 (EL2N/GraNd at epoch 10), Maini et al. 2022 (SSFT: mislabelled and rare examples are
       forgotten fast after training moves to the other half), all against memorization in the
       report's scatter plots and correlation table. Differences: subset models (70%) instead of
       full-data training, averaged over 64 models (the papers average over a few seeds).
"""

from jaxmem import RunConfig


def get_config() -> RunConfig:
  return RunConfig(dataset="tfds:cifar10", model="cnn", model_options={"channels": (32, 64, 128)}, augment=True,
                   num_models=64, subset_ratios=(0.7,), epochs=30, batch_size=128, optimizer="adam",
                   learning_rate=2e-3, schedule="cosine", weight_decay=5e-4, record_epochs=True, score_epoch=10,
                   chunk_size=32)
