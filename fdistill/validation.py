"""Config validation shared by every layer (no imports: methods, samplers and the trainer all use it)."""


def require(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds (config validation; the message names the field)."""
    if not condition:
        raise ValueError(message)
