"""The small deterministic mapping the trainer tests learn: word → colour."""

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "glass"]
COLOURS = ["red", "blue", "green", "gray", "gold", "pink", "black", "white"]


def mapping_records() -> list[dict]:
    return [{"prompt": f"{w} ->", "completion": f" {c}"} for w, c in zip(WORDS, COLOURS)]
