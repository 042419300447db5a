"""Shared infrastructure: user-facing errors, progress events and cancellation, the Mitsuba
runtime set-up, atomic file writes."""
