"""Feldman & Zhang (2020), MNIST: memorization and influence estimates from 2,000 subset models.

Run:   jaxmem run --config experiments/mnist_feldman_zhang.py --data-dir /data/tfds --out runs/mnist-fz
       jaxmem report runs/mnist-fz
Data:  TFDS ``mnist`` prepared offline in ``--data-dir`` (README, "Datasets from TFDS (offline)").
Cost:  estimated, not measured: 2,000 models x 20 epochs x 42,000 examples of a 784-512-256-10 MLP
       is about 2.7 PFLOP of training: roughly 10-20 hours on a 2-core CPU, 10-30 minutes on one
       H100-class GPU (the model axis is vmapped; small dense layers keep the GPU busy only with
       large chunks, so raise ``--chunk-size`` to 256-512 there).
Shows: "What Neural Networks Memorize and Why" (NeurIPS 2020), Sec. 3 and Fig. 1-2 for MNIST: the
       distribution of memorization estimates (most examples near 0, a tail of atypical and
       mislabelled digits near 1) and high-influence train/test pairs (``influence_topk.csv``,
       ``influence_pairs.csv``). The paper trained 2,000 models on 70% subsets; its MNIST network
       differs (we use the 512-256 MLP; the estimator is the same).
"""

from jaxmem import RunConfig


def get_config() -> RunConfig:
  return RunConfig(dataset="tfds:mnist", model="mlp", model_options={"hidden_sizes": (512, 256)},
                   num_models=2000, subset_ratios=(0.7,), epochs=20, batch_size=128, optimizer="adam",
                   learning_rate=1e-3, schedule="cosine", chunk_size=250)
