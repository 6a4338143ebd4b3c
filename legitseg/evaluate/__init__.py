"""Scoring OUT against ground truth, and writing the evaluation."""
