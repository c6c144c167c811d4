"""Accuracy and efficiency runners, reports and plots."""
