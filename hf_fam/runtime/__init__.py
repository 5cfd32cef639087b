"""Running a FAM model: `patch` a loaded model into FAM mode (patching), load a FAM or base checkpoint for the
command line and notebooks (loading), and stream arbitrarily long input through the constant-size cache
(streaming)."""
