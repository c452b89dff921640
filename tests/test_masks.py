import numpy as np
import pytest

from jaxmem.masks import make_masks, ratio_of_models


@pytest.mark.parametrize("num_models,num_train,ratio", [(10, 101, 0.7), (7, 50, 0.1), (4, 3, 0.5)])
def test_subset_rows_have_exactly_round_rn(num_models, num_train, ratio):
  keep, ratios = make_masks("subset", num_models, num_train, (ratio,), seed=3)
  assert keep.shape == (num_models, num_train) and keep.dtype == bool
  np.testing.assert_array_equal(keep.sum(1), round(ratio * num_train))
  np.testing.assert_allclose(ratios, ratio)


def test_subset_column_frequencies_match_ratio():
  keep, _ = make_masks("subset", 400, 300, (0.7,), seed=0)
  frequency = keep.mean(0)
  assert abs(frequency.mean() - 0.7) < 1e-9
  assert frequency.min() > 0.55 and frequency.max() < 0.85


@pytest.mark.parametrize("num_train", [10, 11, 1347])
def test_balanced_columns_in_exactly_half_the_models(num_train):
  keep, ratios = make_masks("balanced", 12, num_train, (0.5,), seed=1)
  np.testing.assert_array_equal(keep.sum(0), 6)
  np.testing.assert_array_equal(keep[0::2] ^ keep[1::2], True)  # complementary pairs
  assert set(keep.sum(1)) <= {num_train // 2, num_train - num_train // 2}
  np.testing.assert_allclose(ratios, 0.5)


@pytest.mark.parametrize("design", ["subset", "balanced"])
def test_masks_deterministic_and_seed_dependent(design):
  a, _ = make_masks(design, 6, 40, (0.5,), seed=7)
  b, _ = make_masks(design, 6, 40, (0.5,), seed=7)
  c, _ = make_masks(design, 6, 40, (0.5,), seed=8)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("design", ["subset", "balanced"])
def test_more_models_extend_rather_than_reshuffle(design):
  small, _ = make_masks(design, 4, 30, (0.5,), seed=0)
  large, _ = make_masks(design, 10, 30, (0.5,), seed=0)
  np.testing.assert_array_equal(large[:4], small)


def test_several_ratios_are_interleaved():
  keep, ratios = make_masks("subset", 9, 100, (0.1, 0.5, 0.9), seed=0)
  np.testing.assert_allclose(ratios, [0.1, 0.5, 0.9] * 3)
  np.testing.assert_array_equal(keep.sum(1), [10, 50, 90] * 3)
  np.testing.assert_allclose(ratio_of_models(4, (0.2, 0.4)), [0.2, 0.4, 0.2, 0.4])


def test_unknown_design_lists_valid_ones():
  from jaxmem.errors import JaxmemError
  with pytest.raises(JaxmemError, match="balanced, subset"):
    make_masks("nope", 2, 10, (0.5,), seed=0)
