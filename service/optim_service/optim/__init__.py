"""The optimizer math, in pure numpy: no web framework is imported below this package."""

from .adagrad import adagrad
from .adam import adam, adamw
from .base import Hyperparameters, Optimizer
from .rmsprop import rmsprop
from .sgd import sgd
from .yogi import yogi

OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (sgd, adagrad, rmsprop, adam, adamw, yogi)}

__all__ = ["OPTIMIZERS", "Hyperparameters", "Optimizer"]
