"""Small requests, large replies: what a client can make the example service hold for it."""


def text(n):
    """n bytes of "x": a reply of about n bytes of JSON."""
    return "x" * n


def escapes(n):
    """n control characters: each is 6 bytes of JSON ("\\u0001"), so the reply is ~6n bytes."""
    return "\x01" * n


def error(n):
    """Raises a ValueError whose message is n bytes: an error reply that large."""
    raise ValueError("e" * n)
