"""lstmgen: train a character-level LSTM on Wikipedia text with Ray, and generate articles."""

__version__ = "0.1.0"
