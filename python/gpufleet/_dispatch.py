"""Placeholder: filled by its part (see the issue tracker). Public names go in __all__."""
__all__: list[str] = []
