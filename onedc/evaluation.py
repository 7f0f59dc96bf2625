"""The evaluation API under its old name: everything now lives in :mod:`onedc.eval`.

Kept so that ``from onedc.evaluation import evaluate, psnr_uint8, ...`` keeps working.
"""
from onedc.eval import *  # noqa: F401,F403
from onedc.eval import __all__  # noqa: F401
