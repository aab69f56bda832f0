"""Kubeflow Pipelines v2 components of prvr: thin shells over ``prvr.stages``.

Each component body imports ``prvr`` and calls one stage function; the logic, and
its tests, live in the package. See components/common.py for the image.
"""
from components.evaluate import evaluate
from components.preprocess import preprocess
from components.register import register
from components.resolve import resolve
from components.train import train

__all__ = ["resolve", "preprocess", "train", "evaluate", "register"]
