"""Everything about processes: degrees and groups, the all-to-all dispatcher, expert parallelism."""
