"""The generated tables of README.md and docs/*.md (`examples/update_readme.py`)."""
