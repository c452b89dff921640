"""Estimators: pure functions of records, and the one explicit registry of their adapters.

An adapter takes :class:`jaxmem.records.Records` (or a block of its examples) and keyword options and
returns an :class:`EstimatorResult`: arrays and numbers only. Reading records, writing tables and
files, and formatting text are the scoring driver's (:mod:`jaxmem.scoring`).
"""

from __future__ import annotations

from jaxmem.registry import Registry
from jaxmem.scores import correlations, counterfactual, cscore, dynamics, influence, lds, lira, lm, proxies, rmia, uncertainty
from jaxmem.scores import memorization as _memorization
from jaxmem.scores._result import Estimator, EstimatorResult
from jaxmem.scores._stats import InOutDifference, auroc, in_out_difference
from jaxmem.scores.memorization import counterfactual_memorization, memorization

#: Every estimator, in the order they run (memorization first: others use its column as context).
#: ``correlations`` runs on the joined score table, after all of them.
ESTIMATOR_LIST = (
    Estimator("memorization", _memorization.memorization_columns, ("train_correct",),
              per_example=True, summarize=_memorization.memorization_summary),
    Estimator("counterfactual", counterfactual.counterfactual_columns, ("train_margin",),
              per_example=True, summarize=counterfactual.counterfactual_summary),
    Estimator("cscore", cscore.cscore_columns, ("train_correct",), default=cscore.several_ratios,
              per_example=True, summarize=cscore.cscore_summary),
    Estimator("learning_speed", cscore.learning_speed_columns, ("train_correct", "train_correct_epochs"),
              per_example=True, summarize=cscore.learning_speed_summary),
    Estimator("uncertainty", uncertainty.uncertainty_columns, ("train_correct",),
              per_example=True, summarize=uncertainty.uncertainty_summary,
              block_bytes=uncertainty.uncertainty_block_bytes),
    Estimator("dynamics", dynamics.dynamics_columns, ("train_correct_epochs",),
              per_example=True, summarize=dynamics.dynamics_summary),
    Estimator("el2n_grand", dynamics.el2n_grand_columns, ("train_el2n", "train_grand"),
              per_example=True, summarize=dynamics.el2n_grand_summary),
    Estimator("influence", influence.influence_estimator, ("train_correct", "test_correct")),
    Estimator("lira", lira.lira_estimator, ("train_margin",), default=False),
    Estimator("rmia", rmia.rmia_estimator, ("train_margin", "test_margin"), default=False),
    Estimator("lds", lds.lds_estimator, ("test_correct", "test_margin"), default=False),
    Estimator("csl", proxies.csl_estimator, ("train_margin_epochs",), default=False),
    # language-model runs (their records exist only there; text_memorization writes their memorization)
    Estimator("text_memorization", lm.text_memorization_estimator,
              ("train_token_accuracy", "train_loglik", "train_extractable")),
    Estimator("exposure", lm.exposure_estimator, ("candidate_logperp",)),
    Estimator("lm_attacks", lm.lm_attacks_estimator, ("train_loglik", "train_token_logprob")),
    Estimator("exact_memorization", lm.exact_memorization_estimator, ("train_token_accuracy_epochs",)),
    Estimator("correlations", lambda records, *, context=None, **options: correlations.correlations_result(
        context or {}, records.noisy)),
)

ESTIMATORS: Registry[Estimator] = Registry.of("estimator", {e.name: e for e in ESTIMATOR_LIST})

__all__ = ["ESTIMATORS", "ESTIMATOR_LIST", "Estimator", "EstimatorResult", "InOutDifference", "auroc",
           "counterfactual_memorization", "in_out_difference", "memorization"]
