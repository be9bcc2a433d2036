"""optim-service: first-order optimizers as a REST service, numerically identical to torch.optim."""

__version__ = "0.1.0"
