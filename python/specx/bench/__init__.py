"""``specx-bench``: microbenchmarks of specx ops against their peers (see ``specx-bench --help``)."""
