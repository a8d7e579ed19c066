"""What runs write and read back: keyed records, vector banks, adapters, other tools' vector files, plots."""
