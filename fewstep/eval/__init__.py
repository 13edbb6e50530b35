"""Evaluation protocols (GenEval-style scoring, ...)."""
