"""Validation of a recipe by the detector it trains: the last step of the flow
reference → measurement → candidates → refinement → recipe → renders → **detector**.

``trainset`` (a bulk set's images, instance masks and true particle centres, and the maps the detector learns),
``detector`` (a small U-Net and its instances by watershed), ``training`` (augmented training
with progress, cancel and resumable checkpoints), ``metrics`` (matching at IoU 0.5, size
distributions, Jensen-Shannon divergence), ``annotations`` (a user's COCO or instance-mask
labels of the reference), ``run`` (:func:`validate_recipe`: render, train, detect, report).
"""
from fitting.validate.run import ValidationReport, validate_recipe

__all__ = ["ValidationReport", "validate_recipe"]
