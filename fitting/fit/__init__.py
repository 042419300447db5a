"""Fitting a reference: candidate proposals (``predictor``, ``candidates``), refinement by
differentiable rendering (``refine``), and the whole fit with its events (``pipeline``)."""
