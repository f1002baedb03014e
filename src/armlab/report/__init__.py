"""Reports: comparability check, tables, intervals, plots."""
