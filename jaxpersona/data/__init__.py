"""Input data: trait files, roles and conversation scripts, chat datasets, run-config files."""
