"""Text datasets: token sequences for language-model memorization, and the loaders that make them.

A :class:`TextDataset` is a :class:`~jaxmem.data.Dataset` whose examples are token sequences:
``x_train`` is ``tokens_NxL`` int32 (``[BOS] tokens [EOS]`` then padding 0 to length L), there are no
labels (``y_train`` is all 0) and ``num_classes`` is the vocabulary size, so masks, the engine, the
store and the run directory treat it like any other dataset. Rows are *unique* sequences:
``copies`` (N,) says how often each occurs in the training corpus, and a model that trains on a
sequence trains on all its copies (membership is per unique sequence, so a canary repeated 16 times
is seen 16 times or never).

Sources, through :func:`jaxmem.data.load_dataset`:

* ``canaries``: an embedded, deterministic corpus (:func:`make_canaries`): sentences of a small
  grammar with frequent templates (a head) and rare ones with words seen nowhere else (a long tail),
  a few sentences duplicated 2-8 times, and canaries ``my pin is d d d d`` (Carlini et al. 2019, "The
  Secret Sharer") with secrets drawn from the enumerable space R of all digit strings, each repeated
  1, 2, 4, 8, 16 times.
* ``PATH.txt``: UTF-8 text, one document per non-empty line, byte-level tokens; a line longer than
  the context is cut into consecutive pieces. The last 10% of the distinct documents are the test set.
* ``tfds:NAME`` of a TFDS text dataset prepared in a local ``data_dir`` (e.g. ``tiny_shakespeare``,
  ``lm1b``): each record's text, byte-level, cut into pieces of the context length.

Nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import zlib
from typing import Any, Sequence

import numpy as np

from jaxmem.data import Dataset, register_dataset, register_file_loader, register_tfds_text_loader
from jaxmem.errors import JaxmemError

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
BYTE_OFFSET = len(SPECIAL_TOKENS)  # byte b is token b + 3
#: Context (tokens per sequence, BOS and EOS included) of .txt and TFDS text datasets.
DEFAULT_CONTEXT = 64
#: Held-out documents of a .txt file: the last fraction of its distinct documents.
TXT_TEST_FRACTION = 0.1
#: The recipe ``jaxmem run --model transformer`` starts from (flags given win over it): enough
#: models for in/out estimates at half-size subsets, epochs enough that 16 copies of a canary are
#: memorized and one copy only partly, on a 2-core CPU in minutes (README, "Language models"). A
#: fixed strategy: auto's probe compiles and times four programs, which cost a busy 2-core CPU
#: five minutes for a run whose training takes one, and the lifted strategies measured within 25%
#: of each other here (benchmarks in the README section).
TEXT_RUN_DEFAULTS = {"num_models": 64, "epochs": 10, "batch_size": 32, "learning_rate": 3e-3,
                     "subset_ratios": (0.5,), "chunk_size": 64, "strategy": "mixed:4"}


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TextDataset(Dataset):
  """A sequence dataset (see the module docstring). Extra fields, per unique training sequence:

  ``copies`` (N,) int64 occurrences in the training corpus; ``canary`` (N,) bool inserted secrets;
  ``prefix_len`` (N,) int32 tokens given to the model in the extraction test (Carlini et al. 2023,
  "k-extractable": the rest of the sequence is the suffix it must reproduce); ``vocab`` the token
  strings; ``tokenizer`` "word" or "byte"; ``secrets`` describes the canaries' randomness space R
  (format tokens, the digit tokens, secret length, and each canary's secret), or None.
  """

  vocab: tuple[str, ...] = ()
  tokenizer: str = "byte"
  copies: np.ndarray | None = None
  canary: np.ndarray | None = None
  prefix_len: np.ndarray | None = None
  secrets: dict[str, Any] | None = None

  def __post_init__(self):
    super().__post_init__()
    for field in ("copies", "canary", "prefix_len"):
      view = np.asarray(getattr(self, field)).view()
      view.flags.writeable = False
      object.__setattr__(self, field, view)

  @property
  def is_text(self) -> bool:
    return True

  @property
  def seq_len(self) -> int:
    return int(self.x_train.shape[1])

  @functools.cached_property
  def fingerprint(self) -> str:
    """The base fingerprint (tokens, vocabulary size) plus the copies and canary flags, which
    change what the models train on and how they are scored."""
    h = hashlib.sha256(Dataset.fingerprint.func(self).encode())
    for key in ("copies", "canary", "prefix_len"):
      a = np.ascontiguousarray(getattr(self, key))
      h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
      h.update(memoryview(a).cast("B"))
    h.update(repr((self.vocab, self.tokenizer)).encode())
    return h.hexdigest()

  def validate(self) -> None:
    """One-line errors for anything the engine cannot train on."""
    for split in ("train", "test"):
      tokens = getattr(self, f"x_{split}")
      if tokens.ndim != 2 or tokens.dtype != np.int32:
        raise JaxmemError(f"x_{split} of a text dataset must be int32 tokens (N, L), got {tokens.dtype} {tokens.shape}")
      if len(tokens) == 0:
        raise JaxmemError(f"text dataset {self.name!r} has no {split} sequences")
      if tokens.min() < 0 or tokens.max() >= self.num_classes:
        raise JaxmemError(f"x_{split} holds token ids outside the vocabulary [0, {self.num_classes})")
    if self.x_train.shape[1] != self.x_test.shape[1]:
      raise JaxmemError(f"train and test sequences differ in length: {self.x_train.shape[1]} and {self.x_test.shape[1]}")
    if self.x_train.shape[1] < 3:
      raise JaxmemError(f"sequences must hold at least 3 tokens (BOS, a token, EOS), got length {self.x_train.shape[1]}")
    n = self.num_train
    for field in ("copies", "canary", "prefix_len"):
      if getattr(self, field).shape != (n,):
        raise JaxmemError(f"{field} must have shape ({n},), got {getattr(self, field).shape}")
    if (self.copies < 1).any():
      raise JaxmemError("copies must be >= 1 for every training sequence")
    lengths = (self.x_train != PAD).sum(axis=1)
    bad = (self.prefix_len < 1) | (self.prefix_len >= lengths - 1)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      raise JaxmemError(f"prefix_len of training sequence {i} is {int(self.prefix_len[i])}; it must leave a suffix "
                        f"of text: 1 <= prefix_len < {int(lengths[i]) - 1} (its {int(lengths[i])} tokens include BOS and EOS)")
    if self.num_classes != len(self.vocab):
      raise JaxmemError(f"num_classes {self.num_classes} must equal the vocabulary size {len(self.vocab)}")

  def __repr__(self) -> str:
    return (f"TextDataset(name={self.name!r}, tokens_train={self.x_train.shape}, tokens_test={self.x_test.shape}, "
            f"vocab={self.num_classes}, tokenizer={self.tokenizer!r}, corpus_size={int(np.sum(self.copies))}, "
            f"canaries={int(np.sum(self.canary))})")

  def secret_index(self) -> np.ndarray:
    """(N,) each canary's secret as an index into the enumerated space R (the number its digits
    spell, i.e. the candidate's position in ``candidate_logperp``), -1 elsewhere."""
    out = np.full(self.num_train, -1, np.int64)
    if self.secrets is not None:
      for entry in self.secrets["canaries"]:
        out[entry["index"]] = int(entry["secret"])
    return out

  def decode(self, tokens_L: np.ndarray) -> str:
    """Text of one token sequence, special tokens dropped."""
    kept = [int(t) for t in tokens_L if int(t) >= BYTE_OFFSET]
    if self.tokenizer == "byte":
      return bytes(t - BYTE_OFFSET for t in kept).decode("utf-8", errors="replace")
    return " ".join(self.vocab[t] for t in kept)

  @functools.cached_property
  def zlib_bytes(self) -> np.ndarray:
    """(N,) length in bytes of each training sequence's text compressed by zlib (level 9), the
    denominator of Carlini et al. (2021)'s zlib membership signal."""
    return np.asarray([len(zlib.compress(self.decode(t).encode("utf-8"), 9)) for t in self.x_train], np.int64)

  def example_info(self) -> dict[str, np.ndarray]:
    """Per-training-sequence arrays a run keeps beside its membership design (for the scores)."""
    return {"copies": np.asarray(self.copies), "canary": np.asarray(self.canary),
            "prefix_len": np.asarray(self.prefix_len), "zlib_bytes": self.zlib_bytes,
            "num_tokens": (np.asarray(self.x_train) != PAD).sum(axis=1).astype(np.int64),
            "secret_index": self.secret_index()}

  def describe(self) -> dict[str, Any]:
    """What the manifest keeps about the text: tokenizer, vocabulary, and the canaries' secrets."""
    out = {"tokenizer": self.tokenizer, "vocab_size": len(self.vocab), "seq_len": self.seq_len,
           "corpus_size": int(np.sum(self.copies))}
    if self.tokenizer == "word":
      out["vocab"] = list(self.vocab)
    if self.secrets is not None:
      out["secrets"] = self.secrets
    return out


def make_text_dataset(name: str, train_docs: Sequence[Sequence[int]], test_docs: Sequence[Sequence[int]], *,
                      vocab: Sequence[str], tokenizer: str, seq_len: int, copies: Sequence[int] | None = None,
                      canary: Sequence[bool] | None = None, prefix_len: Sequence[int] | None = None,
                      secrets: dict[str, Any] | None = None) -> TextDataset:
  """A validated TextDataset from token lists (without BOS/EOS): each becomes ``[BOS] doc [EOS]``
  padded to ``seq_len``. ``prefix_len`` defaults to BOS plus half of the document's tokens."""
  def pack(docs, what):
    tokens = np.zeros((len(docs), seq_len), np.int32)
    for i, doc in enumerate(docs):
      if len(doc) + 2 > seq_len:
        raise JaxmemError(f"{what} sequence {i} has {len(doc)} tokens; with BOS and EOS it exceeds the context {seq_len}")
      tokens[i, : len(doc) + 2] = [BOS, *doc, EOS]
    return tokens
  x_train, x_test = pack(train_docs, "training"), pack(test_docs, "test")
  n = len(train_docs)
  if prefix_len is None:
    prefix_len = [1 + len(doc) // 2 for doc in train_docs]
  ds = TextDataset(
      name=name, x_train=x_train, y_train=np.zeros(n, np.int32), x_test=x_test,
      y_test=np.zeros(len(test_docs), np.int32), num_classes=len(vocab), noisy=np.zeros(n, bool),
      clean_y_train=np.zeros(n, np.int32), vocab=tuple(vocab), tokenizer=tokenizer,
      copies=np.asarray(copies if copies is not None else np.ones(n), np.int64),
      canary=np.asarray(canary if canary is not None else np.zeros(n), bool),
      prefix_len=np.asarray(prefix_len, np.int32), secrets=secrets)
  ds.validate()
  return ds


# ---------------------------------------------------------------------------------------------
# The embedded canary corpus.

_CANARY_TAG = 0xCA7A
_ANIMALS = ("cat", "dog", "bird", "fox", "horse", "mouse", "cow", "duck")
_ADJECTIVES = ("small", "big", "old", "young", "red", "brown", "quiet", "happy")
_VERBS = ("sees", "likes", "follows", "finds", "watches", "chases")
_PLACES = ("garden", "house", "field", "river", "forest", "barn")
_FREQUENT = (
    "the {adj} {animal} {verb} the {animal2}",
    "a {animal} {verb} a {adj} {animal2} in the {place}",
    "every {adj} {animal} sleeps in the {place}",
)
_SYLLABLES = ("ka", "lo", "mi", "ru", "te", "zo", "pa", "ni", "vu", "se", "di", "ho", "gu", "fe", "bo", "ya")
_RARE = (
    "{w1} {w2} never {w3} before {w4}",
    "under {w1} the {w2} {w3} {w4} slowly",
    "{w1} and {w2} count {w3} {w4} at night",
    "only {w1} knows why {w2} {w3} {w4}",
)
CANARY_FORMAT = ("my", "pin", "is")
DIGITS = tuple("0123456789")


def _pseudo_word(rng: np.random.Generator) -> str:
  return "".join(rng.choice(_SYLLABLES, size=3))


def make_canaries(*, num_frequent: int = 240, num_rare: int = 48, duplicated: Sequence[int] = (2, 2, 4, 4, 8, 8),
                  repetitions: Sequence[int] = (1, 2, 4, 8, 16), canaries_per_repetition: int = 2,
                  secret_length: int = 4, num_test: int = 96, name: str = "canaries") -> TextDataset:
  """The embedded corpus: a head of sentences from three frequent templates, a tail of rare-template
  sentences made of pseudo-words seen nowhere else (only memorizing them predicts them), a few
  ordinary sentences duplicated (``duplicated``: their copy counts), and canaries.

  Canaries (Carlini et al. 2019): ``my pin is`` followed by ``secret_length`` digit tokens drawn
  uniformly from R = all digit strings (|R| = 10^secret_length, enumerable), for each count in
  ``repetitions`` ``canaries_per_repetition`` distinct canaries occurring that many times; all share
  the format and the digit tokens, so one candidate space R serves every canary. A canary's
  extraction prefix is its format (``BOS my pin is``): extracting it means emitting the secret.

  The control: a model that did not train on canary A still trained on other canaries and prefers
  their digits, so A's rank under it depends on how A's digits happen to resemble theirs. Averaged
  over the random draw of A the rank is uniform (A is independent of the model), but for a fixed
  corpus the out-models share most of their training data, so their mean exposure for one canary
  varies from canary to canary by about the 1.44-bit spread of one uniform rank, far more than the
  standard error over out-models says; :func:`jaxmem.scores.exposure.fresh_secret_control` gives
  each canary's control its exact chance value and spread, and the mean over all canaries is the
  chance check. (Giving each
  canary digits of its own, tried to remove this, gives the secret away instead: a model ranks a
  canary's candidates by which of its symbols it has ever seen, so one copy reaches the maximum.)
  The test set is ``num_test`` further frequent-template sentences. Word-level tokens. The corpus is
  fixed (not seeded by the run seed), so runs with different seeds score the same sequences.
  """
  for key, value, low in (("num_frequent", num_frequent, 1), ("num_rare", num_rare, 0), ("num_test", num_test, 1),
                          ("canaries_per_repetition", canaries_per_repetition, 0), ("secret_length", secret_length, 1)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise JaxmemError(f"canaries {key} must be an integer >= {low}, got {value!r}")
  if any(int(r) < 1 for r in repetitions) or any(int(d) < 1 for d in duplicated):
    raise JaxmemError(f"canary repetitions and duplicate counts must be >= 1, got {list(repetitions)} and {list(duplicated)}")
  rng = np.random.default_rng([_CANARY_TAG])

  def frequent() -> list[str]:
    template = _FREQUENT[rng.integers(len(_FREQUENT))]
    return template.format(adj=rng.choice(_ADJECTIVES), animal=rng.choice(_ANIMALS), animal2=rng.choice(_ANIMALS),
                           verb=rng.choice(_VERBS), place=rng.choice(_PLACES)).split()

  seen: set[tuple[str, ...]] = set()

  def unique(make) -> list[str]:
    for _ in range(1000):
      words = make()
      if tuple(words) not in seen:
        seen.add(tuple(words))
        return words
    raise JaxmemError("the canary grammar cannot make that many distinct sentences; ask for fewer")

  head = [unique(frequent) for _ in range(num_frequent)]
  tail = [unique(lambda: _RARE[rng.integers(len(_RARE))].format(
      **{f"w{j}": _pseudo_word(rng) for j in range(1, 5)}).split()) for _ in range(num_rare)]
  test = [unique(frequent) for _ in range(num_test)]
  secrets, canary_docs = [], []
  for count in repetitions:
    for _ in range(canaries_per_repetition):
      secret = unique(lambda: list(CANARY_FORMAT) + list(rng.choice(DIGITS, size=secret_length)))[len(CANARY_FORMAT):]
      secrets.append({"secret": "".join(secret), "copies": int(count)})
      canary_docs.append(list(CANARY_FORMAT) + secret)
  copies = [1] * (num_frequent + num_rare) + [int(c) for c in repetitions for _ in range(canaries_per_repetition)]
  for i, count in enumerate(duplicated):  # the first sentences of the head occur `count` times
    copies[i] = int(count)
  docs = head + tail + canary_docs
  words = sorted({w for doc in docs + test for w in doc} - set(DIGITS))
  vocab = list(SPECIAL_TOKENS) + list(DIGITS) + words
  index = {w: t for t, w in enumerate(vocab)}
  encode = lambda doc: [index[w] for w in doc]
  order = rng.permutation(len(docs))  # canaries and the tail spread over the corpus
  docs, copies = [docs[i] for i in order], [copies[i] for i in order]
  is_canary = [i >= num_frequent + num_rare for i in order]
  prefix = [1 + len(CANARY_FORMAT) if c else 1 + len(doc) // 2 for doc, c in zip(docs, is_canary)]
  position_of = np.argsort(order)
  for c, entry in enumerate(secrets):
    entry["index"] = int(position_of[num_frequent + num_rare + c])
  seq_len = max(len(doc) for doc in docs + test) + 2
  description = {"format": list(CANARY_FORMAT), "format_tokens": [BOS] + encode(CANARY_FORMAT),
                 "symbols": list(DIGITS), "symbol_tokens": encode(DIGITS),
                 "length": int(secret_length), "space_size": 10 ** int(secret_length),
                 "canaries": sorted(secrets, key=lambda e: e["index"])}
  return make_text_dataset(name, [encode(d) for d in docs], [encode(d) for d in test], vocab=vocab, tokenizer="word",
                           seq_len=seq_len, copies=copies, canary=is_canary, prefix_len=prefix, secrets=description)


@register_dataset("canaries")
def _load_canaries(*, seed: int, data_dir=None, download: bool = False) -> TextDataset:
  del seed, data_dir, download  # embedded and fixed
  return make_canaries()


# ---------------------------------------------------------------------------------------------
# Byte-level text: .txt files and TFDS text datasets.

BYTE_VOCAB = tuple(SPECIAL_TOKENS) + tuple(f"<{b:02x}>" for b in range(256))


def _byte_tokens(text: str) -> list[int]:
  return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def _pieces(tokens: list[int], size: int) -> list[list[int]]:
  return [tokens[i: i + size] for i in range(0, len(tokens), size)]


def _dedup(docs: list[list[int]]) -> tuple[list[list[int]], list[int]]:
  """Distinct documents in first-seen order, and how often each occurs."""
  counts: dict[tuple[int, ...], int] = {}
  for doc in docs:
    counts[tuple(doc)] = counts.get(tuple(doc), 0) + 1
  return [list(d) for d in counts], list(counts.values())


def text_dataset_from_documents(name: str, documents: Sequence[str], *, test_documents: Sequence[str] | None = None,
                                context: int = DEFAULT_CONTEXT, what: str = "text") -> TextDataset:
  """Byte-level TextDataset from documents: each cut into pieces of ``context - 2`` bytes
  (``[BOS] piece [EOS]``), identical pieces merged into one sequence with its copy count. Without
  ``test_documents`` the last TXT_TEST_FRACTION of the distinct pieces are held out."""
  if context < 3:
    raise JaxmemError(f"context must be at least 3 tokens (BOS, one byte, EOS), got {context}")
  pieces = [p for doc in documents for p in _pieces(_byte_tokens(doc), context - 2) if p]
  if not pieces:
    raise JaxmemError(f"{what} holds no text")
  train, copies = _dedup(pieces)
  if test_documents is None:
    if len(train) < 2:
      raise JaxmemError(f"{what} has {len(train)} distinct sequence; need at least 2 (training and test)")
    num_test = max(1, int(round(TXT_TEST_FRACTION * len(train))))
    train, test, copies = train[:-num_test], train[-num_test:], copies[:-num_test]
  else:
    test = [p for doc in test_documents for p in _pieces(_byte_tokens(doc), context - 2) if p]
    if not test:
      raise JaxmemError(f"{what} has an empty test split")
  return make_text_dataset(name, train, test, vocab=BYTE_VOCAB, tokenizer="byte", seq_len=context, copies=copies)


def load_txt(path: str, *, context: int = DEFAULT_CONTEXT) -> TextDataset:
  """A UTF-8 ``.txt`` file, one document per non-empty line (see the module docstring)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise JaxmemError(f"cannot read text file {path!r}: {e.strerror or e}") from None
  if not raw.strip():
    raise JaxmemError(f"text file {path!r} is empty")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise JaxmemError(f"text file {path!r} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                      "convert it, e.g. iconv -t UTF-8") from None
  lines = [line for line in text.splitlines() if line.strip()]
  return text_dataset_from_documents(path, lines, context=context, what=f"text file {path!r}")


def load_tfds_text(source_of, *, name: str, text_key: str, splits: Sequence[str],
                   context: int = DEFAULT_CONTEXT) -> TextDataset:
  """A TFDS text dataset: ``source_of(split)`` is a random-access data source whose records hold
  ``text_key`` (bytes or str); the first split trains, the second is the test set. Each record is
  cut into pieces of ``context - 2`` bytes (tiny_shakespeare's one record per split becomes
  thousands of sequences)."""
  def documents(split):
    source = source_of(split)
    out = []
    for k in range(len(source)):
      value = source[k][text_key]
      if isinstance(value, (bytes, np.bytes_)):
        try:
          value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
          raise JaxmemError(f"record {k} of {name}/{split} is not UTF-8 text") from None
      out.append(str(value))
    return out
  train_docs = documents(splits[0])
  if sum(len(d) for d in train_docs) < context - 2:
    raise JaxmemError(f"{name} holds {sum(len(d) for d in train_docs)} training bytes, fewer than one "
                      f"sequence of context {context}")
  return text_dataset_from_documents(name, train_docs, test_documents=documents(splits[1]), context=context,
                                     what=name)


register_file_loader(".txt", lambda path: load_txt(path))
register_tfds_text_loader(load_tfds_text)
__all__ = ["BOS", "EOS", "PAD", "TextDataset", "load_txt", "make_canaries", "make_text_dataset",
           "text_dataset_from_documents"]
