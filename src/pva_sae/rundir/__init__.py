"""The run directory: every path (paths), every reader and writer of a run artifact (artifacts), atomic writes, checkpoints, manifest and logs."""
