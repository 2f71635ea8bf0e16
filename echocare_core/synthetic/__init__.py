"""Synthetic ultrasound for demos, tests and benchmarks: the imaging physics (`ultrasound`), the anatomy and the
scanners' device profiles (`scenes`), and whole site datasets in the toolkit's dataset format (`dataset`)."""
