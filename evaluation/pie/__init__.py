"""PIE-Bench: read the benchmark, edit it with the registry's methods, lay out and find a run's
edits, score them with the reference's seven metrics, and report the scores beside the published
Table 1 (docs/evaluation.md).

- dataset.py, masks.py: the mapping file as PieItems (prompts, type, blend words, decoded mask).
- layout.py: RUNS/<method>/annotation_images/<path>, PNG or the reference's JPEG; shared by the
  runner that writes edits and the scorer that reads them.
- metrics.py (names, scales, NaN rules), pixels.py, structure.py, clip.py, networks.py (offline
  weights) with squeeze_lpips.py (LPIPS's SqueezeNet in plain torch), scores.py (items x methods
  -> table.py's ScoreTable and CSV), summary.py (means).
- report.py with plot.py, contact.py and reference.py (Table 1).
- runner.py (the jobs of one process: per-item settings, shared trajectories, resuming), strip.py
  (the reference's 4-panel result), run_log.py (JSON lines per job, the index), world.py (torchrun
  ranks: shares of the items, the final gather).
- run_command.py, score_command.py, report_command.py: `invedit eval run` / `eval score` /
  `eval report` (add_arguments, run).
"""
