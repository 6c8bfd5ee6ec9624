"""Evaluation: the datasets (WikiText-2, LAMBADA), perplexity and last-word accuracy, and figures."""
