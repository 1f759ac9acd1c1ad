"""PIE-Bench: read the benchmark, lay out and find a run's edits, score them with the reference's
seven metrics, and report the scores beside the published Table 1 (docs/evaluation.md).

dataset.py / masks.py: the mapping file as items; layout.py: RUNS/<method>/annotation_images/...;
the scoring and report modules build on those two.
"""
