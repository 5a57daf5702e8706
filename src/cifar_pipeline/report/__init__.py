"""The report stage, and cifar-results (experiments compared over seeds)."""
