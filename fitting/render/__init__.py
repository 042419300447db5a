"""Rendering: procedural particle layouts (``geometry``), Mitsuba ray tracing of a layout
(``tracing``), the SEM/TEM/optical imaging models that shade the traced rays (``imaging``)."""
