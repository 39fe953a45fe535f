"""The project's research apparatus: benchmarks, the evidence grid, the authors' code loaders, the app's
browser check and the README tables. Not installed; the scripts in examples/ import it as `research.*`
(their folder is on `sys.path`), and the tests do too (pytest's `pythonpath = ["examples"]`)."""
