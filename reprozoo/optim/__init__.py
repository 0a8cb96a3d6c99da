"""Optimizers of the official recipes that torch does not ship: AdamATan2 and the sign-SGD of TRM's puzzle embedding."""

from reprozoo.optim.adam_atan2 import AdamATan2, AdamATan2SignSGD
from reprozoo.optim.sign_sgd import SignSGD

__all__ = ["AdamATan2", "AdamATan2SignSGD", "SignSGD"]
