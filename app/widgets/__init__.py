"""Widgets of the matfit window: thin views over :class:`app.model.AppModel`."""
