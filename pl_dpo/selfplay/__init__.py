"""The self-play stages of a run: SFT start, assistants, samples, ranked sets and rounds (docs/ARCHITECTURE.md)."""
