"""pyro_bbt: Bayesian transfer learning with Pyro.

The pipeline, one module per step::

    data (Task, load_task) -> model / prior (BayesianMLP, GaussianPrior, ScaleMixturePrior,
    PerSitePrior) -> guide (make_guide) -> inference (train, objectives, kl_schedules)
    -> evaluation (evaluate) -> transfer (posterior_as_prior, the experiment and its CLI)
"""

from .data import Task, TaskData, load_task
from .evaluation import PredictiveMetrics, evaluate, evaluate_posterior_mean
from .guides import GUIDES, GuideConfig, make_guide, posterior_loc_scale
from .inference import TrainConfig, TrainHistory, train
from .kl_schedules import KL_SCHEDULES, kl_weight
from .model import BayesianMLP
from .objectives import KLScale
from .priors import GaussianPrior, PerSitePrior, ScaleMixturePrior

__version__ = "0.1.0"

__all__ = [
    "Task",
    "TaskData",
    "load_task",
    "BayesianMLP",
    "GaussianPrior",
    "ScaleMixturePrior",
    "PerSitePrior",
    "GUIDES",
    "GuideConfig",
    "make_guide",
    "posterior_loc_scale",
    "KL_SCHEDULES",
    "kl_weight",
    "KLScale",
    "TrainConfig",
    "TrainHistory",
    "train",
    "PredictiveMetrics",
    "evaluate",
    "evaluate_posterior_mean",
]
