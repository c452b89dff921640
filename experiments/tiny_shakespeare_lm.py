"""Counterfactual memorization and extraction of Shakespeare by small byte-level transformers.

Run:   jaxmem run --config experiments/tiny_shakespeare_lm.py --data-dir /data/tfds --out runs/shakespeare-lm
       jaxmem report runs/shakespeare-lm
Data:  TFDS ``tiny_shakespeare`` prepared offline in ``--data-dir`` (README, "Datasets from TFDS
       (offline)"); its one training record (~1 MB) is cut into ~16,000 sequences of 62 bytes
       (context 64 with BOS and EOS), repeated lines merged with their copy counts.
Cost:  estimated, not measured: a 4-layer, width-128 transformer has ~0.8 M parameters; 64 models x
       10 epochs x 8,000 sequences (half the corpus) x 63 tokens x 6 FLOP per parameter and token is
       ~1.5 PFLOP: about 10 hours on a 2-core CPU, minutes on one H100-class GPU.
Shows: Zhang et al. (2021)'s counterfactual memorization on natural text: most sequences are
       predictable from the rest of the corpus (memorization near 0), a tail of idiosyncratic
       lines (names, stage directions) is memorized; the sequences models extract verbatim from a
       31-byte prefix, in-models against out-models; LOSS / zlib / Min-K% membership AUROCs.
       Differences: byte-level tokens and a tiny model instead of Zhang et al.'s T5-base on
       subword tokens, half-size subsets of one corpus rather than of a web crawl.
"""

from jaxmem import RunConfig


def get_config() -> RunConfig:
  return RunConfig(dataset="tfds:tiny_shakespeare", model="transformer",
                   model_options={"num_layers": 4, "width": 128, "num_heads": 4, "max_len": 64, "positions": "rotary"},
                   num_models=64, subset_ratios=(0.5,), epochs=10, batch_size=64, optimizer="adam",
                   learning_rate=1e-3, schedule="warmup_cosine", warmup_epochs=1, chunk_size=32)
