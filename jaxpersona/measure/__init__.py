"""Measurement: statistics, judges and the check they must pass, judge-free evaluation, the persona axis."""
