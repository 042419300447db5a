"""Bulk rendering of labelled training sets: ``jobs`` (what one worker renders per image),
``labels`` (instance masks and their records), ``files`` (folder layout, PNG encoding),
``annotations`` (COCO and the particle table), ``run`` (the driver: pool or Dask, resume, cancel).
"""
from fitting.output.bulk.run import DatasetResult, render_dataset

__all__ = ["DatasetResult", "render_dataset"]
