"""What a recipe produces: labelled training sets (``bulk``), plain Mitsuba 3 scenes
(``export``), library galleries (``gallery``)."""
