"""Running Flower's processes: starting, stopping and checking SuperLinks and SuperNodes (`processes`), and a whole
federation on one machine for the demo, tests and benchmarks (`testbed`)."""
