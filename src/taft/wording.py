"""User-facing wording shared by messages: counts with their noun in the right number."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 epoch", "2 epochs", "0 epochs" (`plural`: the plural form when it is not noun + "s")."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
