"""The optimizer math, in pure numpy: no web framework is imported below this package.

One module per algorithm, each an ``Optimizer`` (``base.py``); this registry is every place that
lists them: the API's validation and catalogue, the record layout, kernel warm-up, the tests' cases.
"""

from .adadelta import adadelta
from .adafactor import adafactor
from .adagrad import adagrad
from .adam import adam, adamw
from .adamax import adamax
from .asgd import asgd
from .base import Hyperparameters, Optimizer
from .lion import lion
from .muon import muon
from .nadam import nadam
from .radam import radam
from .rmsprop import rmsprop
from .rprop import rprop
from .sgd import sgd
from .yogi import yogi

OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    sgd, adagrad, rmsprop, adam, adamw, adamax, nadam, radam, adadelta, rprop, asgd, adafactor, muon, lion, yogi)}

__all__ = ["OPTIMIZERS", "Hyperparameters", "Optimizer"]
